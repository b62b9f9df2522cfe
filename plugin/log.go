package plugin

import (
	"context"
	"io"
	"log/slog"
	"strings"

	"github.com/meshlane/meshlane/daemon/api"
)

// logger writes key=value lines to stderr, which the runtime sends to its
// journal, and relays the important ones to the agent so that they show up
// in the meshlane-agent's log too, where operators actually look.
type logger struct {
	out         *slog.Logger
	verb        string
	containerID string
	// relay is nil when there is no agent to relay to.
	relay    *agentClient
	relayMin slog.Level
}

func newLogger(w io.Writer, level slog.Level, relay *agentClient, verb, containerID string) *logger {
	out := slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: level})).
		With("plugin", "meshlane-cni", "cmd", verb)
	if containerID != "" {
		out = out.With("containerID", containerID)
	}
	// Relaying costs a request per line: only warnings and errors go to the
	// agent unless the operator asked for debug output.
	relayMin := max(level, slog.LevelWarn)
	if level == slog.LevelDebug {
		relayMin = slog.LevelDebug
	}
	return &logger{out: out, verb: verb, containerID: containerID, relay: relay, relayMin: relayMin}
}

func (l *logger) debug(msg string, kv ...string) { l.log(slog.LevelDebug, msg, kv) }
func (l *logger) info(msg string, kv ...string)  { l.log(slog.LevelInfo, msg, kv) }
func (l *logger) warn(msg string, kv ...string)  { l.log(slog.LevelWarn, msg, kv) }
func (l *logger) error(msg string, kv ...string) { l.log(slog.LevelError, msg, kv) }

// log takes key, value pairs; a trailing key without value is dropped.
func (l *logger) log(level slog.Level, msg string, kv []string) {
	attrs := make([]any, 0, len(kv)/2)
	for i := 0; i+1 < len(kv); i += 2 {
		attrs = append(attrs, slog.String(kv[i], kv[i+1]))
	}
	l.out.Log(context.Background(), level, msg, attrs...)
	if l.relay == nil || level < l.relayMin {
		return
	}
	fields := map[string]string{"cmd": l.verb}
	for i := 0; i+1 < len(kv); i += 2 {
		fields[kv[i]] = kv[i+1]
	}
	l.relay.relay(api.LogRecord{
		Level:       strings.ToLower(level.String()),
		Msg:         msg,
		ContainerID: l.containerID,
		Fields:      fields,
	})
}
