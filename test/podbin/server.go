package main

import (
	"bufio"
	"fmt"
	"io"
	"log"
	"net"
	"strings"
	"sync/atomic"
	"time"

	"github.com/meshlane/meshlane/test/podbin/wire"
)

const serverUsage = `usage: podbin server [flags]

A line based app server. The client sends "HELLO <token>\n"; the server
answers "<name> remote=<ip:port> local=<ip:port>\n" with the addresses its
accepted socket sees, then echoes every further byte until the client
half-closes.

Flags:
`

// helloTimeout bounds how long a connection may take to say HELLO.
const helloTimeout = 10 * time.Second

type server struct {
	name   string
	events *wire.Writer
	nextID atomic.Uint64
}

func runServer(args []string) error {
	fs := newFlagSet("server", serverUsage)
	listen := fs.String("listen", "0.0.0.0:8080,[::]:8080", "listen addresses, comma separated")
	name := fs.String("name", "server", "name put first in every reply")
	events := fs.String("events", "", "append one JSON line per connection event to this file")
	ready := fs.String("ready", "", "write the bound addresses to this file once every listener is up")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usageError(fs, "unexpected arguments %q", fs.Args())
	}
	if strings.ContainsAny(*name, " \n") {
		return usageError(fs, "--name %q must not contain spaces or newlines", *name)
	}
	addrs, err := parseAddrPorts(*listen)
	if err != nil {
		return usageError(fs, "--listen: %v", err)
	}
	s := &server{name: *name}
	if *events != "" {
		if s.events, err = wire.Create(*events); err != nil {
			return err
		}
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
	errc := make(chan error, len(lns))
	for _, ln := range lns {
		go func() {
			for {
				c, err := ln.AcceptTCP()
				if err != nil {
					errc <- fmt.Errorf("listener %s: accept: %w", ln.Addr(), err)
					return
				}
				go s.handle(c)
			}
		}()
	}
	return <-errc
}

func (s *server) handle(c *net.TCPConn) {
	defer c.Close()
	ev := wire.ServerEvent{
		Event:  wire.EventAccepted,
		ID:     s.nextID.Add(1),
		Name:   s.name,
		Local:  c.LocalAddr().String(),
		Remote: c.RemoteAddr().String(),
	}
	c.SetDeadline(time.Now().Add(helloTimeout))
	br := bufio.NewReaderSize(c, 4096)
	line, err := br.ReadSlice('\n')
	token, ok := strings.CutPrefix(strings.TrimSuffix(string(line), "\n"), "HELLO ")
	switch {
	case err != nil:
		ev.Err = fmt.Sprintf("reading HELLO line: %v", err)
	case !ok || token == "" || strings.Contains(token, " "):
		ev.Err = fmt.Sprintf("bad HELLO line %q", line)
		fmt.Fprintf(c, "ERR want \"HELLO <token>\"\n")
	}
	ev.Token = token
	s.record(ev)
	if ev.Err != "" {
		return
	}
	if _, err := fmt.Fprintf(c, "%s remote=%s local=%s\n", s.name, ev.Remote, ev.Local); err != nil {
		ev.Event, ev.Err = wire.EventClosed, fmt.Sprintf("writing reply: %v", err)
		s.record(ev)
		return
	}
	c.SetDeadline(time.Time{})

	ev.Event = wire.EventClosed
	ev.Bytes, err = echo(c, br)
	if err != nil {
		ev.Err = fmt.Sprintf("echo: %v", err)
	} else if err := c.CloseWrite(); err != nil {
		ev.Err = fmt.Sprintf("half close: %v", err)
	}
	s.record(ev)
}

// echo writes back everything read from r (which holds bytes already
// buffered after the HELLO line) until EOF.
func echo(c *net.TCPConn, r io.Reader) (int64, error) { return plainCopy(c, r) }

// plainCopy moves bytes with a read/write loop. Unlike io.Copy it never
// turns into splice(2) between TCP connections, whose behaviour on sockets
// fed by sk_msg is one of the kernel hazards the tests measure.
func plainCopy(dst io.Writer, src io.Reader) (int64, error) {
	buf := make([]byte, 32<<10)
	var total int64
	for {
		n, rerr := src.Read(buf)
		if n > 0 {
			w, werr := dst.Write(buf[:n])
			total += int64(w)
			if werr != nil {
				return total, werr
			}
		}
		if rerr == io.EOF {
			return total, nil
		}
		if rerr != nil {
			return total, rerr
		}
	}
}

func (s *server) record(ev wire.ServerEvent) {
	ev.Time = time.Now()
	if err := s.events.Write(ev); err != nil {
		log.Print(err)
	}
}
