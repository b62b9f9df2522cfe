package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net/url"
	"time"

	"github.com/meshlane/meshlane/daemon/api"
)

func commands() map[string]command {
	var (
		connsPod   string
		watch      time.Duration
		watchCount int
	)
	return map[string]command{
		"status": {
			about: "Shows the agent's version and uptime, the kernel, the default mesh profile, the pods by state,\nthe attached programs with their bpf link and program ids, the kernel features found, the\nfast path (sockmap) setting and every map's fill level.",
			run:   noArgs(runStatus),
		},
		"pods": {
			args:  " [POD]",
			about: "Lists the pods the agent holds: namespace/name, container id, IPs, netns cookie, profile,\nstate and reason. With POD, shows that pod's full record and effective settings: listener\nports, proxy uid/gid, included and excluded ports and CIDRs.",
			run:   runPods,
		},
		"conns": {
			about: "Lists the live connections the datapath redirected, read from the kernel's socket storage:\nboth ends of each, the original destination, the kind (outbound to the own sidecar, inbound\nto a pod's inbound listener), and whether sk_msg short-circuits it.",
			flags: func(fs *flag.FlagSet) {
				fs.StringVar(&connsPod, "pod", "", "only connections of this pod (an address of it, or its sidecar as the listener)")
			},
			run: noArgs(func(ctx context.Context, e *env) error { return runConns(ctx, e, connsPod) }),
		},
		"counters": {
			about: "Shows the datapath's counters: redirects, pass-through decisions by cause, original-destination\nand sockhash bookkeeping. With --watch, prints each counter's rate per second over every\ninterval until Ctrl-C (or --count intervals).",
			flags: func(fs *flag.FlagSet) {
				fs.DurationVar(&watch, "watch", 0, "print rates per second over this interval, repeatedly (e.g. 1s)")
				fs.IntVar(&watchCount, "count", 0, "with --watch: stop after this many intervals (0: until Ctrl-C)")
			},
			run: noArgs(func(ctx context.Context, e *env) error { return runCounters(ctx, e, watch, watchCount) }),
		},
		"events": {
			about: "Shows the agent's recent events, oldest first: pods added, meshed, deleted and collected,\nand log lines relayed from the CNI plugin.",
			run:   noArgs(runEvents),
		},
		"check": {
			args:  " POD",
			about: "Self-tests one pod's datapath entries against what the agent decided: its network namespace,\nits meshlane_pods entry and settings, each IP in meshlane_podips, its port and CIDR rules; for\na pod that is not meshed, that nothing is written for it. Each failed check says what to do.\nExits 1 when a check fails.",
			run:   runCheck,
		},
	}
}

func noArgs(fn func(context.Context, *env) error) func(context.Context, *env, []string) error {
	return func(ctx context.Context, e *env, args []string) error {
		if len(args) > 0 {
			return usagef("unexpected arguments %q", args)
		}
		return fn(ctx, e)
	}
}

func podQuery(path, pod string) string {
	if pod == "" {
		return path
	}
	return path + "?" + url.Values{api.QueryPod: {pod}}.Encode()
}

// printJSON writes v indented, for scripts.
func (e *env) printJSON(v any) error {
	enc := json.NewEncoder(e.out)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func runStatus(ctx context.Context, e *env) error {
	var st api.Status
	if err := e.get(ctx, api.PathStatus, &st); err != nil {
		return err
	}
	if e.json {
		return e.printJSON(st)
	}
	return renderStatus(e.out, st)
}

func runPods(ctx context.Context, e *env, args []string) error {
	switch len(args) {
	case 0:
		var pods []api.PodStatus
		if err := e.get(ctx, api.PathPods, &pods); err != nil {
			return err
		}
		if e.json {
			return e.printJSON(pods)
		}
		return renderPods(e.out, pods)
	case 1:
		var pods []api.PodStatus
		if err := e.get(ctx, podQuery(api.PathPods, args[0]), &pods); err != nil {
			return err
		}
		if len(pods) != 1 {
			return fmt.Errorf("the agent answered %d pods for %q, want one", len(pods), args[0])
		}
		if e.json {
			return e.printJSON(pods[0])
		}
		return renderPod(e.out, pods[0])
	}
	return usagef("at most one POD, got %q", args)
}

func runConns(ctx context.Context, e *env, pod string) error {
	var c api.Conns
	if err := e.get(ctx, podQuery(api.PathConns, pod), &c); err != nil {
		return err
	}
	if e.json {
		return e.printJSON(c)
	}
	return renderConns(e.out, c)
}

func runEvents(ctx context.Context, e *env) error {
	var evs []api.Event
	if err := e.get(ctx, api.PathEvents, &evs); err != nil {
		return err
	}
	if e.json {
		return e.printJSON(evs)
	}
	return renderEvents(e.out, evs)
}

func runCheck(ctx context.Context, e *env, args []string) error {
	if len(args) != 1 {
		return usagef("name exactly one POD to check")
	}
	var rep api.CheckReport
	if err := e.get(ctx, podQuery(api.PathSelfCheck, args[0]), &rep); err != nil {
		return err
	}
	var err error
	if e.json {
		err = e.printJSON(rep)
	} else {
		err = renderCheck(e.out, rep)
	}
	if err == nil && !rep.OK {
		return errProblem
	}
	return err
}

// rates is one interval of `counters --watch`.
type rates struct {
	Time            time.Time          `json:"time"`
	IntervalSeconds float64            `json:"intervalSeconds"`
	Totals          map[string]uint64  `json:"totals"`
	PerSecond       map[string]float64 `json:"perSecond"`
}

func runCounters(ctx context.Context, e *env, watch time.Duration, count int) error {
	if watch < 0 || count < 0 {
		return usagef("--watch and --count must not be negative")
	}
	if watch == 0 {
		if count != 0 {
			return usagef("--count needs --watch")
		}
		var c api.Counters
		if err := e.get(ctx, api.PathCounters, &c); err != nil {
			return err
		}
		if e.json {
			return e.printJSON(c)
		}
		return renderCounters(e.out, c.Counters)
	}
	if watch < 100*time.Millisecond {
		return usagef("--watch %s is shorter than 100ms", watch)
	}
	var prev api.Counters
	if err := e.get(ctx, api.PathCounters, &prev); err != nil {
		return err
	}
	t := time.NewTicker(watch)
	defer t.Stop()
	for n := 0; count == 0 || n < count; n++ {
		select {
		case <-ctx.Done():
			// Ctrl-C ends a watch normally.
			return nil
		case <-t.C:
		}
		var cur api.Counters
		if err := e.get(ctx, api.PathCounters, &cur); err != nil {
			if errors.Is(err, context.Canceled) {
				return nil
			}
			return err
		}
		r := rateOf(prev, cur)
		prev = cur
		var err error
		if e.json {
			// One compact object per line, for streaming consumers.
			err = json.NewEncoder(e.out).Encode(r)
		} else {
			err = renderRates(e.out, r)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// rateOf is the per-second change of every counter between two reads. A
// counter that went down (the datapath was reloaded from scratch) counts
// from zero.
func rateOf(prev, cur api.Counters) rates {
	secs := cur.Time.Sub(prev.Time).Seconds()
	r := rates{Time: cur.Time, IntervalSeconds: secs, Totals: cur.Counters, PerSecond: map[string]float64{}}
	for name, v := range cur.Counters {
		delta := v
		if p, ok := prev.Counters[name]; ok && p <= v {
			delta = v - p
		}
		if secs > 0 {
			r.PerSecond[name] = float64(delta) / secs
		}
	}
	return r
}
