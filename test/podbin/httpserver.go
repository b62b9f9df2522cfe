package main

import (
	"fmt"
	"net/http"
	"strconv"
	"time"
)

const httpServerUsage = `usage: podbin http-server [flags]

A minimal HTTP/1.1 app server for load tests: every GET (or HEAD) on any
path is answered 200 with the same body of --body-bytes bytes; connections
are kept alive unless the client asks to close.

Flags:
`

// Generous limits: they only stop a stuck client from holding a connection
// forever, never a load generator that is merely slow under load.
const (
	httpReadHeaderTimeout = 10 * time.Second
	httpIdleTimeout       = 60 * time.Second
)

func runHTTPServer(args []string) error {
	fs := newFlagSet("http-server", httpServerUsage)
	listen := fs.String("listen", "0.0.0.0:8080,[::]:8080", "listen addresses, comma separated")
	size := fs.Int("body-bytes", 1024, "size of the response body")
	ready := fs.String("ready", "", "write the bound addresses to this file once every listener is up")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usageError(fs, "unexpected arguments %q", fs.Args())
	}
	if *size < 0 || *size > 1<<30 {
		return usageError(fs, "--body-bytes %d: want 0 to 1 GiB", *size)
	}
	addrs, err := parseAddrPorts(*listen)
	if err != nil {
		return usageError(fs, "--listen: %v", err)
	}
	lns, err := listenAll(addrs, listenOpts{})
	if err != nil {
		return err
	}
	if *ready != "" {
		if err := writeReady(*ready, lns); err != nil {
			return err
		}
	}
	srv := &http.Server{
		Handler:           fixedBody(*size),
		ReadHeaderTimeout: httpReadHeaderTimeout,
		IdleTimeout:       httpIdleTimeout,
	}
	errc := make(chan error, len(lns))
	for _, ln := range lns {
		go func() { errc <- fmt.Errorf("listener %s: %w", ln.Addr(), srv.Serve(ln)) }()
	}
	return <-errc
}

// fixedBody answers every GET and HEAD with the same body, built once, so
// the server spends as little as possible per request and a benchmark
// measures the path between client and server rather than the server.
func fixedBody(size int) http.Handler {
	body := make([]byte, size)
	for i := range body {
		body[i] = 'a' + byte(i%26)
	}
	length := strconv.Itoa(size)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			http.Error(w, "only GET and HEAD", http.StatusMethodNotAllowed)
			return
		}
		h := w.Header()
		h["Content-Type"] = []string{"application/octet-stream"}
		h["Content-Length"] = []string{length}
		if r.Method == http.MethodHead {
			return
		}
		// A client gone mid-body needs no answer: ignore the error.
		w.Write(body)
	})
}
