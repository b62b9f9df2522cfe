package agent

import (
	"net/http"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"

	"github.com/meshlane/meshlane/daemon/api"
)

// CNI verbs, the verb label of the request metrics.
const (
	verbAdd   = "ADD"
	verbDel   = "DEL"
	verbCheck = "CHECK"
	verbGC    = "GC"
)

// Results of a CNI request, the result label: answered, refused as a bad
// or unknown request (4xx), or failed in the agent (5xx).
const (
	resultOK       = "ok"
	resultRejected = "rejected"
	resultFailed   = "failed"
)

// Datapath counters named *_bytes count bytes, not decisions.
const bytesSuffix = "_bytes"

var (
	descDecisions = prometheus.NewDesc("meshlane_datapath_decisions_total",
		"Datapath events by reason: redirects, pass-through decisions and their causes, original-destination and sockhash bookkeeping.",
		[]string{"reason"}, nil)
	descBytes = prometheus.NewDesc("meshlane_datapath_bytes_total",
		"Bytes the datapath handled, by reason (msg_redirected: bytes sk_msg handed straight to the peer socket).",
		[]string{"reason"}, nil)
	descPods = prometheus.NewDesc("meshlane_pods",
		"Pods the agent holds, by state.", []string{"state"}, nil)
	descMapEntries = prometheus.NewDesc("meshlane_map_entries",
		"Entries in each datapath map.", []string{"map"}, nil)
	descMapCapacity = prometheus.NewDesc("meshlane_map_capacity",
		"Capacity (max entries) of each datapath map.", []string{"map"}, nil)
	descInstaller = prometheus.NewDesc("meshlane_installer_state",
		"1 for the CNI plugin installer's current state; absent while the agent runs no installer.", []string{"state"}, nil)
	descBuildInfo = prometheus.NewDesc("meshlane_build_info",
		"Always 1; the agent's version as a label.", []string{"version"}, nil)
)

// metrics is the agent's Prometheus registry: the CNI request metrics it
// updates as requests are served, and a collector that reads the pods and
// the datapath at each scrape.
type metrics struct {
	reg      *prometheus.Registry
	requests *prometheus.CounterVec
	duration *prometheus.HistogramVec
	log      *zap.Logger
}

func newMetrics(a *Agent) *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshlane_cni_requests_total",
			Help: "CNI plugin requests served, by verb and result (ok, rejected: 4xx, failed: 5xx).",
		}, []string{"verb", "result"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "meshlane_cni_request_duration_seconds",
			Help: "Time to serve a CNI plugin request, by verb. An ADD includes the map write and the state file fsync.",
			// From a map write (tens of µs) to the plugin's 5 s timeout.
			Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5},
		}, []string{"verb"}),
		log: a.log,
	}
	// Every series exists from the start, so rates and alerts see zeros
	// rather than gaps.
	for _, v := range []string{verbAdd, verbDel, verbCheck, verbGC} {
		for _, r := range []string{resultOK, resultRejected, resultFailed} {
			m.requests.WithLabelValues(v, r)
		}
		m.duration.WithLabelValues(v)
	}
	m.reg.MustRegister(m.requests, m.duration, agentCollector{a},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// handler serves the registry in the Prometheus text format. A datapath
// read error fails only the metrics it concerns.
func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{
		ErrorHandling: promhttp.ContinueOnError,
		ErrorLog:      zap.NewStdLog(m.log.Named("metrics")),
	})
}

// instrument counts and times one CNI verb's requests.
func (m *metrics) instrument(verb string, h func(http.ResponseWriter, *http.Request)) func(http.ResponseWriter, *http.Request) {
	return func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		sw := &statusWriter{ResponseWriter: w, code: http.StatusOK}
		h(sw, r)
		m.duration.WithLabelValues(verb).Observe(time.Since(start).Seconds())
		m.requests.WithLabelValues(verb, result(sw.code)).Inc()
	}
}

func result(code int) string {
	switch {
	case code >= 500:
		return resultFailed
	case code >= 400:
		return resultRejected
	}
	return resultOK
}

// statusWriter remembers the status code a handler answered with.
type statusWriter struct {
	http.ResponseWriter
	code int
}

func (w *statusWriter) WriteHeader(code int) {
	w.code = code
	w.ResponseWriter.WriteHeader(code)
}

// agentCollector reads the pods and the datapath at each scrape, so the
// metrics are never staler than the scrape itself.
type agentCollector struct{ a *Agent }

func (c agentCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descDecisions, descBytes, descPods, descMapEntries, descMapCapacity, descInstaller, descBuildInfo} {
		ch <- d
	}
}

func (c agentCollector) Collect(ch chan<- prometheus.Metric) {
	a := c.a
	ch <- prometheus.MustNewConstMetric(descBuildInfo, prometheus.GaugeValue, 1, a.version)
	for state, n := range a.podsByState() {
		ch <- prometheus.MustNewConstMetric(descPods, prometheus.GaugeValue, float64(n), state)
	}
	if is, ok := a.installState(); ok {
		ch <- prometheus.MustNewConstMetric(descInstaller, prometheus.GaugeValue, 1, is.State)
	}
	if a.view == nil {
		return
	}
	if counters, err := a.view.Counters(); err != nil {
		ch <- prometheus.NewInvalidMetric(descDecisions, err)
	} else {
		for name, v := range counters {
			if reason, ok := strings.CutSuffix(name, bytesSuffix); ok {
				ch <- prometheus.MustNewConstMetric(descBytes, prometheus.CounterValue, float64(v), reason)
				continue
			}
			ch <- prometheus.MustNewConstMetric(descDecisions, prometheus.CounterValue, float64(v), name)
		}
	}
	if fill, err := a.view.MapFill(); err != nil {
		ch <- prometheus.NewInvalidMetric(descMapEntries, err)
	} else {
		for name, f := range fill {
			ch <- prometheus.MustNewConstMetric(descMapEntries, prometheus.GaugeValue, float64(f.Entries), name)
			ch <- prometheus.MustNewConstMetric(descMapCapacity, prometheus.GaugeValue, float64(f.Capacity), name)
		}
	}
}

// ProbeHandler serves /healthz, /readyz and /metrics for the kubelet's
// probes and Prometheus over TCP, where no peer credentials exist: it
// serves nothing else, and nothing that changes state or names a pod.
func (a *Agent) ProbeHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+api.PathHealthz, handleHealthz)
	mux.HandleFunc("GET "+api.PathReadyz, a.handleReadyz)
	mux.Handle("GET "+api.PathMetrics, a.metrics.handler())
	return mux
}
