package plugin

import (
	"context"
	"time"

	"github.com/meshlane/meshlane/daemon/api"
)

// relayTimeout bounds one relayed log line: the relay is a courtesy and must
// never hold up the runtime.
const relayTimeout = 300 * time.Millisecond

// agentClient wraps the shared socket client with the plugin's time limit
// and stops relaying log lines once the agent proved unreachable.
type agentClient struct {
	timeout time.Duration
	api     *api.Client
	// down is set once a request could not reach the agent, so the log
	// relay stops paying for connection attempts that will fail too.
	down bool
}

func newAgentClient(socket string, timeout time.Duration) *agentClient {
	return &agentClient{timeout: timeout, api: api.NewClient(socket)}
}

// agentDown reports whether err means the agent could not do the work (not
// reachable, timed out, or a 5xx answer) as opposed to refusing the request.
func agentDown(err error) bool {
	s := api.StatusOf(err)
	return s == 0 || s >= 500
}

// call makes one request bounded by the configured timeout. in is sent as
// JSON when non-nil. It returns the body of a 2xx answer; any other answer
// is an *api.StatusError.
func (c *agentClient) call(method, path string, in any) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()
	return c.do(ctx, method, path, in)
}

// relay sends one log record to the agent, best-effort.
func (c *agentClient) relay(rec api.LogRecord) {
	if c.down {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), min(relayTimeout, c.timeout))
	defer cancel()
	_, _ = c.do(ctx, api.MethodPost, api.PathLog, rec)
}

func (c *agentClient) do(ctx context.Context, method, path string, in any) ([]byte, error) {
	raw, err := c.api.Do(ctx, method, path, in)
	if err != nil && api.StatusOf(err) == 0 {
		c.down = true
	}
	return raw, err
}
