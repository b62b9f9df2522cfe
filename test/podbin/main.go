// Command podbin is the test pods' program: a mesh sidecar stand-in, an
// app server and an app client, chosen by the first argument. Privileged
// tests, the demo and the benchmark run it inside pod network namespaces.
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
)

const usage = `usage: podbin <command> [flags]

Commands:
  sidecar   L4 mesh sidecar stand-in: reads SO_ORIGINAL_DST and relays
  server    app server: answers HELLO with the addresses it sees, then echoes
  client    app client: HELLO exchange and optional echo check, JSON results
  http-server  HTTP/1.1 keep-alive server answering every GET with a fixed body
  hold      opens many connections to the app server and holds them open

Run "podbin <command> --help" for the flags of a command.
`

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	var run func([]string) error
	switch os.Args[1] {
	case "sidecar":
		run = runSidecar
	case "server":
		run = runServer
	case "client":
		run = runClient
	case "http-server":
		run = runHTTPServer
	case "hold":
		run = runHold
	case "-h", "-help", "--help", "help":
		fmt.Print(usage)
		return
	default:
		fmt.Fprintf(os.Stderr, "podbin: unknown command %q\n\n%s", os.Args[1], usage)
		os.Exit(2)
	}
	err := run(os.Args[2:])
	switch {
	case err == nil:
	case errors.Is(err, flag.ErrHelp):
	case errors.Is(err, errUsage):
		os.Exit(2)
	default:
		fmt.Fprintf(os.Stderr, "podbin %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}
