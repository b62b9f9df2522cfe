package plugin

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/meshlane/meshlane/daemon/api"
)

// agentHint is what an operator should do when the agent cannot be reached.
const agentHint = `check the meshlane-agent DaemonSet pod on this node: it must be Running and Ready (see its logs); ` +
	`the runtime retries the pod. To start pods unmeshed while the agent is down, set "failPolicy": "open"`

// Funcs returns the plugin's verbs for skel.PluginMainFuncs.
func Funcs() skel.CNIFuncs {
	r := &runner{stderr: os.Stderr}
	return skel.CNIFuncs{Add: r.cmdAdd, Del: r.cmdDel, Check: r.cmdCheck, Status: r.cmdStatus, GC: r.cmdGC}
}

// runner holds what the verbs share; tests point stderr at a buffer.
type runner struct {
	stderr io.Writer
}

// chainedCall is what ADD and CHECK share: the config, the prevResult a
// chained plugin must get, the agent client, the logger and the pod event.
type chainedCall struct {
	conf  *Config
	prev  types.Result
	agent *agentClient
	log   *logger
	ev    api.PodEvent
}

func (r *runner) chained(args *skel.CmdArgs, verb string) (c chainedCall, err error) {
	if c.conf, err = parseConfig(args.StdinData); err != nil {
		return c, err
	}
	if c.prev, err = requirePrevResult(c.conf); err != nil {
		return c, err
	}
	c.agent = newAgentClient(c.conf.Socket, c.conf.Timeout)
	c.log = newLogger(r.stderr, c.conf.LogLevel, c.agent, verb, args.ContainerID)
	c.ev, err = newPodEvent(args, c.conf, c.prev)
	return c, err
}

func (r *runner) cmdAdd(args *skel.CmdArgs) error {
	c, err := r.chained(args, "ADD")
	if err != nil {
		return err
	}
	conf, prev, agent, log, ev := c.conf, c.prev, c.agent, c.log, c.ev
	log.debug("reporting pod to the meshlane agent", "pod", podKey(ev), "ips", strings.Join(ev.IPs, ","), "netns", ev.Netns)

	raw, err := agent.call(api.MethodPost, api.PathAdd, ev)
	if err != nil {
		if terr := agentFailure(conf, log, ev, "take", err); terr != nil {
			return terr
		}
		return types.PrintResult(prev, conf.Conf.CNIVersion)
	}
	var pr api.PodResponse
	if err := json.Unmarshal(raw, &pr); err != nil {
		// The agent took the pod; only its answer is unreadable.
		log.warn("meshlane agent accepted the pod but its answer is unreadable", "pod", podKey(ev), "error", err.Error())
	} else {
		kv := []string{"pod", podKey(ev), "state", pr.State}
		if pr.Reason != "" {
			kv = append(kv, "reason", pr.Reason)
		}
		log.info("pod reported to the meshlane agent", kv...)
	}
	return types.PrintResult(prev, conf.Conf.CNIVersion)
}

func (r *runner) cmdDel(args *skel.CmdArgs) error {
	// DEL must always succeed: a failing DEL leaves pods stuck Terminating.
	conf, err := parseConfig(args.StdinData)
	if err != nil {
		newLogger(r.stderr, slog.LevelInfo, nil, "DEL", args.ContainerID).error(
			"config unreadable, pod removal not reported; the agent keeps the pod until its own cleanup or the next CNI GC",
			"error", err.Error())
		return nil
	}
	agent := newAgentClient(conf.Socket, conf.Timeout)
	log := newLogger(r.stderr, conf.LogLevel, agent, "DEL", args.ContainerID)
	// The pod's addresses help the agent find it, but DEL may come without
	// (or with a stale) prevResult.
	var prev types.Result
	if conf.Conf.RawPrevResult != nil {
		if err := version.ParsePrevResult(&conf.Conf); err != nil {
			log.debug("ignoring unreadable prevResult", "error", err.Error())
		} else {
			prev = conf.Conf.PrevResult
		}
	}
	ev, err := newPodEvent(args, conf, prev)
	if err != nil {
		log.warn("reporting pod removal with incomplete pod details", "error", err.Error())
	}
	if _, err := agent.call(api.MethodPost, api.PathDel, ev); err != nil {
		log.warn("meshlane agent did not take the pod removal; it keeps the pod until its own cleanup or the next CNI GC",
			"pod", podKey(ev), "socket", conf.Socket, "error", err.Error())
		return nil
	}
	log.info("pod removal reported to the meshlane agent", "pod", podKey(ev))
	return nil
}

func (r *runner) cmdCheck(args *skel.CmdArgs) error {
	c, err := r.chained(args, "CHECK")
	if err != nil {
		return err
	}
	conf, agent, log, ev := c.conf, c.agent, c.log, c.ev
	if _, err := agent.call(api.MethodPost, api.PathCheck, ev); err != nil {
		return agentFailure(conf, log, ev, "check", err)
	}
	log.debug("meshlane agent holds the pod", "pod", podKey(ev))
	return nil
}

func (r *runner) cmdStatus(args *skel.CmdArgs) error {
	conf, err := parseConfig(args.StdinData)
	if err != nil {
		return err
	}
	// With failPolicy open the plugin never blocks a pod, so the node can
	// take pods whatever the agent's state.
	if conf.FailOpen {
		return nil
	}
	if _, err := newAgentClient(conf.Socket, conf.Timeout).call(api.MethodGet, api.PathHealthz, nil); err != nil {
		return types.NewError(types.ErrPluginNotAvailable,
			fmt.Sprintf("meshlane-cni: the meshlane agent at %s is not available: %v", conf.Socket, err),
			`pods cannot start on this node while it is down ("failPolicy": "closed"); `+agentHint)
	}
	return nil
}

func (r *runner) cmdGC(args *skel.CmdArgs) error {
	conf, err := parseConfig(args.StdinData)
	if err != nil {
		return err
	}
	agent := newAgentClient(conf.Socket, conf.Timeout)
	log := newLogger(r.stderr, conf.LogLevel, agent, "GC", "")
	// An empty list is meaningful (no pod is valid any more): send [] not null.
	req := api.GCRequest{ValidAttachments: make([]api.Attachment, 0, len(conf.Conf.ValidAttachments))}
	for _, a := range conf.Conf.ValidAttachments {
		req.ValidAttachments = append(req.ValidAttachments, api.Attachment{ContainerID: a.ContainerID, IfName: a.IfName})
	}
	raw, err := agent.call(api.MethodPost, api.PathGC, req)
	if err != nil {
		code := types.ErrInvalidNetworkConfig
		if agentDown(err) {
			code = types.ErrTryAgainLater
		}
		log.warn("meshlane agent did not run GC", "error", err.Error())
		return types.NewError(code, fmt.Sprintf("meshlane-cni: the meshlane agent at %s did not run GC: %v", conf.Socket, err),
			"GC is advisory: the runtime calls it again later; "+agentHint)
	}
	var gr api.GCResponse
	if err := json.Unmarshal(raw, &gr); err != nil {
		log.warn("meshlane agent ran GC but its answer is unreadable", "error", err.Error())
		return nil
	}
	log.info("meshlane agent dropped stale pods", "valid", fmt.Sprint(len(req.ValidAttachments)),
		"removed", strings.Join(gr.Removed, ","))
	return nil
}

// requirePrevResult returns the previous plugin's result, which ADD and
// CHECK need for the pod's addresses and must hand back unchanged.
func requirePrevResult(conf *Config) (types.Result, error) {
	if conf.Conf.RawPrevResult == nil {
		return nil, types.NewError(types.ErrInvalidNetworkConfig,
			"meshlane-cni: no prevResult in the config: meshlane-cni must be called as a chained plugin",
			"list it after the pod network plugin in the plugins array of a .conflist, never as a .conf of its own")
	}
	if err := version.ParsePrevResult(&conf.Conf); err != nil {
		return nil, fieldError("prevResult", err.Error())
	}
	return conf.Conf.PrevResult, nil
}

// agentFailure decides what a failed ADD or CHECK request means for the
// pod: nil when the pod may go on (failPolicy open, or an excluded
// namespace such as meshlane's own), the error for the runtime otherwise.
func agentFailure(conf *Config, log *logger, ev api.PodEvent, what string, err error) error {
	var terr *types.Error
	switch {
	case api.StatusOf(err) == api.StatusNotFound && what == "check":
		terr = types.NewError(types.ErrUnknownContainer,
			fmt.Sprintf("meshlane-cni: meshlane agent does not hold container %s: %v", ev.ContainerID, err),
			"the agent lost track of the pod (restarted without its state?); delete the pod so the runtime sets it up again")
	case agentDown(err):
		terr = types.NewError(types.ErrTryAgainLater,
			fmt.Sprintf("meshlane-cni: the meshlane agent at %s could not %s %s: %v", conf.Socket, what, podRef(ev), err),
			agentHint)
	default:
		terr = types.NewError(types.ErrInvalidNetworkConfig,
			fmt.Sprintf("meshlane-cni: the meshlane agent rejected %s: %v", podRef(ev), err),
			"fix what the message names (often a pod annotation) and recreate the pod")
	}
	switch {
	case conf.Excluded[ev.PodNamespace]:
		log.warn("ignoring meshlane agent failure for a pod in an excluded namespace", "pod", podKey(ev), "error", terr.Error())
		return nil
	case conf.FailOpen:
		log.warn(`ignoring meshlane agent failure ("failPolicy": "open"): the pod runs without meshlane redirection`,
			"pod", podKey(ev), "error", terr.Error())
		return nil
	}
	log.error("meshlane agent failure blocks the pod", "pod", podKey(ev), "error", terr.Msg)
	return terr
}
