package main

import (
	"strings"
	"testing"
	"time"
)

// A keep-alive run as wrk 4.1 prints it.
const wrkKeepalive = `Running 1s test @ http://127.0.0.1:18080/
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   377.47us  834.41us   8.20ms   90.21%
    Req/Sec    34.38k     1.46k   36.92k    72.73%
  Latency Distribution
     50%   95.00us
     75%  157.00us
     90%    1.17ms
     99%    3.96ms
  37543 requests in 1.10s, 40.89MB read
Requests/sec:  34128.98
Transfer/sec:     37.17MB
`

// A failing run: errors, seconds-long percentiles, small transfer units.
const wrkErrors = `Running 2s test @ http://198.18.0.12:8080/
  2 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.20s   300.00ms   2.00s    70.00%
    Req/Sec     1.00      2.00     5.00     80.00%
  Latency Distribution
     50%    1.10s
     75%    1.50s
     90%    1.90s
     99%    2.00s
  12 requests in 2.00s, 500.00B read
  Socket errors: connect 3, read 2, write 1, timeout 4
  Non-2xx or 3xx responses: 5
Requests/sec:      6.00
Transfer/sec:     250.00B
`

func TestParseWrk(t *testing.T) {
	r, err := parseWrk(wrkKeepalive)
	if err != nil {
		t.Fatal(err)
	}
	want := WrkResult{
		Requests:    37543,
		Elapsed:     1100 * time.Millisecond,
		BytesRead:   40.89 * 1024 * 1024,
		RequestsSec: 34128.98,
		BytesSec:    37.17 * 1024 * 1024,
		P50:         95 * time.Microsecond,
		P75:         157 * time.Microsecond,
		P90:         1170 * time.Microsecond,
		P99:         3960 * time.Microsecond,
	}
	if r != want {
		t.Fatalf("parsed\n%+v\nwant\n%+v", r, want)
	}
	if r.Errors() != 0 {
		t.Fatalf("errors %d, want 0", r.Errors())
	}
}

func TestParseWrkErrors(t *testing.T) {
	r, err := parseWrk(wrkErrors)
	if err != nil {
		t.Fatal(err)
	}
	if r.ConnectErrors != 3 || r.ReadErrors != 2 || r.WriteErrors != 1 || r.Timeouts != 4 || r.Non2xx3xx != 5 {
		t.Fatalf("errors %+v: want connect 3, read 2, write 1, timeout 4, non-2xx 5", r)
	}
	if r.Errors() != 15 {
		t.Fatalf("Errors() %d, want 15", r.Errors())
	}
	if r.P50 != 1100*time.Millisecond || r.P99 != 2*time.Second {
		t.Fatalf("p50 %s, p99 %s: want 1.1s and 2s", r.P50, r.P99)
	}
	if r.BytesRead != 500 || r.BytesSec != 250 || r.Requests != 12 || r.RequestsSec != 6 {
		t.Fatalf("totals %+v", r)
	}
}

// Output missing what the report needs must fail, never read as zeros.
func TestParseWrkRejects(t *testing.T) {
	for name, tc := range map[string]struct {
		out, wantErr string
	}{
		"empty":           {"", "lacks"},
		"wrk usage error": {"Usage: wrk <options> <url>\n  Options:\n", "lacks"},
		"no --latency": {
			strings.Replace(wrkKeepalive, "  Latency Distribution\n", "", 1),
			"latency 50%",
		},
		"no Transfer/sec": {
			strings.Replace(wrkKeepalive, "Transfer/sec:     37.17MB\n", "", 1),
			"Transfer/sec",
		},
		"bad percentile unit": {
			strings.Replace(wrkKeepalive, "95.00us", "95.00xs", 1),
			`"95.00xs"`,
		},
		"bad size": {
			strings.Replace(wrkKeepalive, "40.89MB read", "40.89MiB read", 1),
			`"40.89MiB"`,
		},
		"bad socket errors line": {
			strings.Replace(wrkErrors, "timeout 4", "timeout", 1),
			"four name/count pairs",
		},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := parseWrk(tc.out)
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("error %v, want one mentioning %q", err, tc.wantErr)
			}
		})
	}
}

func TestParseWrkUnits(t *testing.T) {
	for in, want := range map[string]time.Duration{
		"12.00us": 12 * time.Microsecond,
		"1.50ms":  1500 * time.Microsecond,
		"2.00s":   2 * time.Second,
		"1.50m":   90 * time.Second,
		"1.00h":   time.Hour,
	} {
		got, err := parseWrkTime(in)
		if err != nil || got != want {
			t.Errorf("parseWrkTime(%q) = %s, %v; want %s", in, got, err, want)
		}
	}
	for in, want := range map[string]float64{
		"512.00B": 512,
		"1.50KB":  1536,
		"2.00MB":  2 << 20,
		"1.00GB":  1 << 30,
	} {
		got, err := parseWrkBytes(in)
		if err != nil || got != want {
			t.Errorf("parseWrkBytes(%q) = %g, %v; want %g", in, got, err, want)
		}
	}
}
