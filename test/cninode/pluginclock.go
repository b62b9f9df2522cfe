package cninode

import (
	"context"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/version"
)

// pluginClock runs plugins as libcni does by default and times each one
// for the chain call whose context carries a pluginTimes. A chain call's
// total mixes every plugin's work; one plugin's own process time, within
// the same call, is what that plugin adds to it, measured without
// subtracting two noisy distributions taken apart.
type pluginClock struct {
	invoke.RawExec
	version.PluginDecoder
}

func newPluginClock() *pluginClock {
	return &pluginClock{RawExec: invoke.RawExec{Stderr: os.Stderr}}
}

func (c *pluginClock) ExecPlugin(ctx context.Context, pluginPath string, stdinData []byte, environ []string) ([]byte, error) {
	start := time.Now()
	out, err := c.RawExec.ExecPlugin(ctx, pluginPath, stdinData, environ)
	if t, ok := ctx.Value(pluginTimesKey{}).(*pluginTimes); ok {
		t.add(filepath.Base(pluginPath), time.Since(start))
	}
	return out, err
}

type pluginTimesKey struct{}

// pluginTimes collects one chain call's plugin times, by plugin file name
// (a plugin run twice in a call is summed).
type pluginTimes struct {
	mu   sync.Mutex
	took map[string]time.Duration
}

func timePlugins(ctx context.Context) (context.Context, *pluginTimes) {
	t := &pluginTimes{took: map[string]time.Duration{}}
	return context.WithValue(ctx, pluginTimesKey{}, t), t
}

func (t *pluginTimes) add(plugin string, d time.Duration) {
	t.mu.Lock()
	t.took[plugin] += d
	t.mu.Unlock()
}

func (t *pluginTimes) get() map[string]time.Duration {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.took
}
