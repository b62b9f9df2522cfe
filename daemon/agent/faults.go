package agent

import (
	"fmt"
	"os"
	"slices"
	"strings"
	"syscall"

	"go.uber.org/zap"
)

// FaultEnv names the environment variable that makes the agent kill itself
// with SIGKILL at one step of ADD or DEL, as an OOM kill or a node crash
// would. It exists only for the crash tests (test/e2e/faults_test.go),
// which start the real agent binary with it and then check that a
// restarted agent and the pinned maps agree about the pod. It is read once,
// in New; unset (any production node) each step costs one comparison of
// two small integers.
const FaultEnv = "MESHLANE_FAULT"

// fault is a step of ADD or DEL where the agent can be made to die.
type fault uint8

// Fault points, in the order each verb reaches them.
const (
	noFault fault = iota
	// faultAddAfterCookie: the netns cookie is read; nothing is written.
	faultAddAfterCookie
	// faultAddAfterState: the pod's state file is written; the maps do
	// not hold it yet.
	faultAddAfterState
	// faultAddAfterMaps: state file and maps hold the pod; only the
	// answer to the plugin is missing.
	faultAddAfterMaps
	// faultDelAfterMaps: the pod is gone from the maps; its state file
	// is still there.
	faultDelAfterMaps
	// faultDelAfterState: the pod is gone from the maps and its state
	// file is removed; only the answer is missing.
	faultDelAfterState
)

// FaultPoints are the values FaultEnv accepts, in the order ADD and DEL
// reach them.
var FaultPoints = []string{
	"add:after-cookie",
	"add:after-state",
	"add:after-maps",
	"del:after-maps",
	"del:after-state",
}

// faultFromEnv reads FaultEnv. An unknown value is an error rather than
// no fault: a crash test whose point was misspelt must not pass by never
// crashing.
func faultFromEnv() (fault, error) {
	v := os.Getenv(FaultEnv)
	if v == "" {
		return noFault, nil
	}
	i := slices.Index(FaultPoints, v)
	if i < 0 {
		return noFault, fmt.Errorf("agent: %s=%q names no fault point (known: %s): unset it outside crash tests",
			FaultEnv, v, strings.Join(FaultPoints, ", "))
	}
	return fault(i + 1), nil
}

func (f fault) String() string {
	if f == noFault || int(f) > len(FaultPoints) {
		return "none"
	}
	return FaultPoints[f-1]
}

// crashAt kills the process with SIGKILL when f is the configured fault
// point: no deferred function, no buffered write and no answer gets out.
func (a *Agent) crashAt(f fault) {
	if a.fault != f {
		return
	}
	a.log.Error("fault injection: killing the agent", zap.String("env", FaultEnv), zap.Stringer("point", f))
	a.log.Sync()
	syscall.Kill(os.Getpid(), syscall.SIGKILL)
	// SIGKILL is delivered before the kill call returns to user space;
	// never go on to the next step if it somehow is not.
	select {}
}
