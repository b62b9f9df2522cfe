// Command meshlanectl shows what the meshlane agent on this node holds and
// what its datapath does: pods and their effective settings, redirected
// connections, decision counters, recent events, and a self-check of one
// pod's datapath entries. It talks to the agent's root-only unix socket.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/meshlane/meshlane/daemon/api"
)

// Exit codes scripts can rely on.
const (
	exitOK          = 0
	exitProblem     = 1 // check found a problem, pod not found, agent error
	exitUsage       = 2
	exitUnreachable = 3 // no answer from the agent's socket
)

// envSocket overrides the default socket path.
const envSocket = "MESHLANE_SOCKET"

// requestTimeout bounds one request to the agent.
const requestTimeout = 15 * time.Second

const usage = `usage: meshlanectl [--socket PATH] [-o table|json] <command> [args]

Shows what the meshlane agent on this node holds and what its datapath does.
Run it as root on the node (the agent's socket is root-only).

Commands:
  status                 agent version, kernel, attached programs, features, map fill
  pods [POD]             pods the agent holds; with POD, its full record and settings
  conns [--pod POD]      live redirected connections, from the datapath itself
  counters [--watch D]   datapath decision counters; with --watch, rates per second
  events                 the agent's recent pod events, oldest first
  check POD              self-test of one pod's datapath entries (exit 1 on a problem)

POD is namespace/name, a name unique on the node, one of the pod's IPs, or
its container id (or a unique prefix of it).

Flags (before or after the command):
  --socket PATH   the agent's socket (env MESHLANE_SOCKET; default ` + api.DefaultSocket + `)
  -o FORMAT       table (default) or json

Exit codes: 0 ok; 1 check found a problem, pod not found, or the agent
refused; 2 usage error; 3 agent unreachable.

Run "meshlanectl <command> --help" for a command's flags.
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr, os.Getenv)
	stop()
	os.Exit(code)
}

// globals are the flags every command takes.
type globals struct {
	socket string
	output string
}

func (g *globals) register(fs *flag.FlagSet) {
	fs.StringVar(&g.socket, "socket", g.socket, "the agent's unix socket (env "+envSocket+")")
	fs.StringVar(&g.output, "o", g.output, "output format: table or json")
}

// command is one subcommand.
type command struct {
	args  string // positional arguments, for the usage line
	about string
	// flags registers the command's own flags.
	flags func(*flag.FlagSet)
	// run does the work with the positional arguments.
	run func(ctx context.Context, e *env, args []string) error
}

// env is what a command runs with.
type env struct {
	client *api.Client
	socket string
	json   bool
	out    io.Writer
}

// usageErr is a command-line mistake: exit 2.
type usageErr struct{ msg string }

func (e *usageErr) Error() string { return e.msg }

func usagef(format string, args ...any) error { return &usageErr{fmt.Sprintf(format, args...)} }

// errProblem is a finding, not a failure to ask: exit 1, the finding
// already printed.
var errProblem = errors.New("problem found")

// run is the whole program: it returns the exit code.
func run(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) int {
	g := globals{socket: api.DefaultSocket, output: "table"}
	if s := getenv(envSocket); s != "" {
		g.socket = s
	}
	top := flag.NewFlagSet("meshlanectl", flag.ContinueOnError)
	top.SetOutput(io.Discard)
	g.register(top)
	if err := top.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprint(stdout, usage)
			return exitOK
		}
		fmt.Fprintf(stderr, "meshlanectl: %v\n\n%s", err, usage)
		return exitUsage
	}
	rest := top.Args()
	if len(rest) == 0 {
		fmt.Fprint(stderr, usage)
		return exitUsage
	}
	name, rest := rest[0], rest[1:]
	if name == "help" {
		fmt.Fprint(stdout, usage)
		return exitOK
	}
	cmd, ok := commands()[name]
	if !ok {
		fmt.Fprintf(stderr, "meshlanectl: unknown command %q\n\n%s", name, usage)
		return exitUsage
	}

	fs := flag.NewFlagSet("meshlanectl "+name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	g.register(fs)
	if cmd.flags != nil {
		cmd.flags(fs)
	}
	help := func(w io.Writer) {
		fmt.Fprintf(w, "usage: meshlanectl %s%s [flags]\n\n%s\n\nFlags:\n", name, cmd.args, cmd.about)
		fs.SetOutput(w)
		fs.PrintDefaults()
		fs.SetOutput(io.Discard)
	}
	pos, err := parseInterleaved(fs, rest)
	if errors.Is(err, flag.ErrHelp) {
		help(stdout)
		return exitOK
	}
	if err == nil && g.output != "table" && g.output != "json" {
		err = fmt.Errorf("-o %q: want table or json", g.output)
	}
	if err != nil {
		fmt.Fprintf(stderr, "meshlanectl %s: %v\n\n", name, err)
		help(stderr)
		return exitUsage
	}

	e := &env{client: api.NewClient(g.socket), socket: g.socket, json: g.output == "json", out: stdout}
	err = cmd.run(ctx, e, pos)
	var ue *usageErr
	switch {
	case err == nil:
		return exitOK
	case errors.As(err, &ue):
		fmt.Fprintf(stderr, "meshlanectl %s: %s\n\n", name, ue.msg)
		help(stderr)
		return exitUsage
	case errors.Is(err, errProblem):
		return exitProblem
	case api.StatusOf(err) == 0 && !errors.Is(err, context.Canceled) && !errors.Is(err, errDecode):
		// The client's error names the socket.
		fmt.Fprintf(stderr, "meshlanectl: cannot reach the meshlane agent: %v\n%s", err, unreachableHint(err))
		return exitUnreachable
	default:
		fmt.Fprintf(stderr, "meshlanectl %s: %v\n", name, err)
		return exitProblem
	}
}

// unreachableHint says what to look at when the socket does not answer.
func unreachableHint(err error) string {
	if errors.Is(err, os.ErrPermission) {
		return "The socket is root-only: run meshlanectl as root on the node.\n"
	}
	return "Check that meshlane-agent runs on this node: kubectl -n meshlane-system get pods -o wide\n" +
		"(its socket is " + api.DefaultSocket + " on the host; pass --socket or " + envSocket + " for another path).\n"
}

// parseInterleaved parses flags anywhere among the positional arguments,
// so `check web -o json` works like `check -o json web`. A lone "--" ends
// the flags.
func parseInterleaved(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		args = fs.Args()
		if len(args) == 0 {
			return pos, nil
		}
		if args[0] == "--" {
			return append(pos, args[1:]...), nil
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
}

// errDecode marks an answer that arrived but could not be understood: the
// agent is reachable, so it is not exit 3.
var errDecode = errors.New("undecodable answer")

// get fetches path and decodes its JSON into out.
func (e *env) get(ctx context.Context, path string, out any) error {
	ctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	raw, err := e.client.Do(ctx, http.MethodGet, path, nil)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(raw, out); err != nil {
		return fmt.Errorf("%w from %s: %v (is meshlanectl older or newer than the agent?)", errDecode, path, err)
	}
	return nil
}
