package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"golang.org/x/sys/unix"

	"github.com/meshlane/meshlane/daemon/api"
)

// maxBody bounds a request body. A pod event with all its annotations is
// a few KiB; anything larger is a broken or hostile client.
const maxBody = 64 << 10

// Server timeouts. The plugin's calls are short; an ADD does at most a few
// syscalls, a map write and an fsync.
const (
	readHeaderTimeout = 5 * time.Second
	readTimeout       = 10 * time.Second
	writeTimeout      = 30 * time.Second
	idleTimeout       = 60 * time.Second
)

// ListenUnix creates the agent's socket at path: the parent directory is
// created 0700, a stale socket file from a previous run is removed, and
// the socket is made 0600. It refuses to take over a socket another agent
// is still serving.
func ListenUnix(path string) (net.Listener, error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create socket dir %s: %w", dir, err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != os.ModeSocket {
			return nil, fmt.Errorf("%s exists and is not a socket: remove it or choose another --socket", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("another process is serving %s: stop it first", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("remove stale socket %s: %w", path, err)
		}
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	// The 0700 directory already keeps others out while the mode is set.
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("chmod 0600 %s: %w", path, err)
	}
	return l, nil
}

// newServer builds the HTTP server. It exists from New on so that a
// Shutdown racing ahead of Serve still stops it: Serve on a shut-down
// server returns at once.
func (a *Agent) newServer() *http.Server {
	return &http.Server{
		Handler:           a.Handler(),
		ReadHeaderTimeout: readHeaderTimeout,
		ReadTimeout:       readTimeout,
		WriteTimeout:      writeTimeout,
		IdleTimeout:       idleTimeout,
		MaxHeaderBytes:    maxBody,
		ConnContext:       withPeer,
		ErrorLog:          zap.NewStdLog(a.log.Named("http")),
	}
}

// Serve answers requests on l until Shutdown. It returns nil after a
// Shutdown, or the error that stopped it.
func (a *Agent) Serve(l net.Listener) error {
	if err := a.srv.Serve(l); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// Shutdown stops accepting connections and waits, until ctx ends, for the
// requests in flight.
func (a *Agent) Shutdown(ctx context.Context) error {
	return a.srv.Shutdown(ctx)
}

type peerKey struct{}

// peer is what SO_PEERCRED said about a connection's process.
type peer struct {
	cred *unix.Ucred
	err  error
}

// withPeer reads the connecting process's credentials once per
// connection; the handler refuses every request of a non-root peer.
func withPeer(ctx context.Context, c net.Conn) context.Context {
	p := peer{err: errors.New("not a unix socket connection")}
	if uc, ok := c.(*net.UnixConn); ok {
		p = peerCred(uc)
	}
	return context.WithValue(ctx, peerKey{}, p)
}

func peerCred(c *net.UnixConn) peer {
	raw, err := c.SyscallConn()
	if err != nil {
		return peer{err: err}
	}
	var p peer
	if err := raw.Control(func(fd uintptr) {
		p.cred, p.err = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return peer{err: err}
	}
	return p
}

// route is one endpoint: its method and handler.
type route struct {
	method string
	handle func(w http.ResponseWriter, r *http.Request)
}

// Handler returns the agent's HTTP API, root callers only.
func (a *Agent) Handler() http.Handler {
	routes := map[string]route{
		api.PathAdd:     {http.MethodPost, a.metrics.instrument(verbAdd, a.podHandler(a.Add))},
		api.PathDel:     {http.MethodPost, a.metrics.instrument(verbDel, a.podHandler(a.Del))},
		api.PathCheck:   {http.MethodPost, a.metrics.instrument(verbCheck, a.podHandler(a.Check))},
		api.PathGC:      {http.MethodPost, a.metrics.instrument(verbGC, a.handleGC)},
		api.PathLog:     {http.MethodPost, a.handleLog},
		api.PathPods:    {http.MethodGet, a.handlePods},
		api.PathHealthz: {http.MethodGet, handleHealthz},
		api.PathReadyz:  {http.MethodGet, a.handleReadyz},
	}
	for path, h := range a.debugRoutes() {
		routes[path] = route{http.MethodGet, h}
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p, _ := r.Context().Value(peerKey{}).(peer)
		if p.err != nil || p.cred == nil {
			writeError(w, http.StatusForbidden, fmt.Sprintf("cannot read the caller's credentials (SO_PEERCRED): %v", p.err))
			return
		}
		if p.cred.Uid != 0 {
			a.log.Warn("refused a non-root caller", zap.Uint32("uid", p.cred.Uid), zap.Int32("pid", p.cred.Pid))
			writeError(w, http.StatusForbidden, fmt.Sprintf("caller uid %d refused: only root may use the meshlane agent socket", p.cred.Uid))
			return
		}
		rt, ok := routes[r.URL.Path]
		if !ok {
			writeError(w, http.StatusNotFound, fmt.Sprintf("no endpoint %s", r.URL.Path))
			return
		}
		if r.Method != rt.method {
			w.Header().Set("Allow", rt.method)
			writeError(w, http.StatusMethodNotAllowed, fmt.Sprintf("%s %s: use %s", r.Method, r.URL.Path, rt.method))
			return
		}
		r.Body = http.MaxBytesReader(w, r.Body, maxBody)
		rt.handle(w, r)
	})
}

// podHandler serves one of ADD, DEL, CHECK.
func (a *Agent) podHandler(op func(api.PodEvent) (api.PodResponse, error)) func(http.ResponseWriter, *http.Request) {
	return func(w http.ResponseWriter, r *http.Request) {
		ev, err := DecodePodEvent(r.Body)
		if err != nil {
			writeDecodeError(w, err)
			return
		}
		resp, err := op(ev)
		if err != nil {
			writeOpError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, resp)
	}
}

func (a *Agent) handleGC(w http.ResponseWriter, r *http.Request) {
	// validAttachments must be present: a client that misnamed the field
	// would otherwise drop every pod on the node. An explicit empty list
	// (or null) means the runtime has no attachments left.
	var raw map[string]json.RawMessage
	if err := decodeJSON(r.Body, &raw); err != nil {
		writeDecodeError(w, err)
		return
	}
	list, ok := raw["validAttachments"]
	if !ok {
		writeError(w, http.StatusBadRequest, `GC request lacks "validAttachments": send the runtime's list (empty to drop every pod)`)
		return
	}
	var valid []api.Attachment
	if err := json.Unmarshal(list, &valid); err != nil {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("GC request: validAttachments: %v", err))
		return
	}
	resp, err := a.GC(valid)
	if err != nil {
		writeOpError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, resp)
}

// handleLog puts a plugin log line into the agent's log, so plugin logs
// are not lost in the runtime's journal.
func (a *Agent) handleLog(w http.ResponseWriter, r *http.Request) {
	var rec api.LogRecord
	if err := decodeJSON(r.Body, &rec); err != nil {
		writeDecodeError(w, err)
		return
	}
	level, err := zapcore.ParseLevel(rec.Level)
	if err != nil {
		level = zapcore.InfoLevel
	}
	fields := []zap.Field{zap.String("source", "cni-plugin"), zap.String("container_id", rec.ContainerID)}
	for k, v := range rec.Fields {
		fields = append(fields, zap.String("plugin."+k, v))
	}
	if ce := a.log.Check(level, rec.Msg); ce != nil {
		ce.Write(fields...)
	}
	a.events.add(Event{Time: time.Now(), Kind: EventPluginLog, ContainerID: rec.ContainerID, Message: rec.Level + ": " + rec.Msg})
	w.WriteHeader(http.StatusNoContent)
}

// handlePods lists the held pods, or with ?pod= the one it names.
func (a *Agent) handlePods(w http.ResponseWriter, r *http.Request) {
	if !r.URL.Query().Has(api.QueryPod) {
		writeJSON(w, http.StatusOK, a.Pods())
		return
	}
	rec, err := a.FindPod(r.URL.Query().Get(api.QueryPod))
	if err != nil {
		writeOpError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, []PodRecord{rec})
}

func handleHealthz(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	io.WriteString(w, "ok\n")
}

func (a *Agent) handleReadyz(w http.ResponseWriter, _ *http.Request) {
	if a.ready != nil {
		if ok, why := a.ready(); !ok {
			writeError(w, http.StatusServiceUnavailable, "not ready: "+why)
			return
		}
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	io.WriteString(w, "ok\n")
}

// writeDecodeError answers a body that could not be read: 413 when it
// was too large, 400 otherwise.
func writeDecodeError(w http.ResponseWriter, err error) {
	var tooBig *http.MaxBytesError
	if errors.As(err, &tooBig) {
		writeError(w, http.StatusRequestEntityTooLarge,
			fmt.Sprintf("request body larger than %d bytes: trim the pod's annotations or report a plugin bug", tooBig.Limit))
		return
	}
	writeError(w, http.StatusBadRequest, err.Error())
}

func writeOpError(w http.ResponseWriter, err error) {
	code := http.StatusInternalServerError
	var se *statusError
	if errors.As(err, &se) {
		code = se.code
	}
	writeError(w, code, err.Error())
}

func writeError(w http.ResponseWriter, code int, msg string) {
	writeJSON(w, code, api.Error{Error: msg})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v)
}
