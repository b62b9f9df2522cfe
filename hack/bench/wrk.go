package main

import (
	"bufio"
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"
)

// WrkResult is what one wrk run printed (wrk 4.x with --latency).
type WrkResult struct {
	Requests    int64         `json:"requests"`
	Elapsed     time.Duration `json:"elapsed"`
	BytesRead   float64       `json:"bytesRead"`
	RequestsSec float64       `json:"requestsPerSec"`
	BytesSec    float64       `json:"bytesPerSec"`
	// Latency percentiles from the "Latency Distribution" block.
	P50 time.Duration `json:"p50"`
	P75 time.Duration `json:"p75"`
	P90 time.Duration `json:"p90"`
	P99 time.Duration `json:"p99"`
	// Errors wrk counted; any of them makes the run suspect.
	ConnectErrors int64 `json:"connectErrors"`
	ReadErrors    int64 `json:"readErrors"`
	WriteErrors   int64 `json:"writeErrors"`
	Timeouts      int64 `json:"timeouts"`
	Non2xx3xx     int64 `json:"non2xx3xx"`
}

// Errors sums every kind of error wrk reported.
func (r WrkResult) Errors() int64 {
	return r.ConnectErrors + r.ReadErrors + r.WriteErrors + r.Timeouts + r.Non2xx3xx
}

// parseWrk reads wrk's human output. It insists on the lines every
// successful run prints (the request total, Requests/sec, Transfer/sec and
// the four percentiles), so a changed wrk format fails loudly instead of
// reporting zeros.
func parseWrk(out string) (WrkResult, error) {
	var r WrkResult
	var haveTotal, haveRPS, haveBPS bool
	pct := map[string]*time.Duration{"50%": &r.P50, "75%": &r.P75, "90%": &r.P90, "99%": &r.P99}
	seen := map[string]bool{}
	inDist := false
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		f := strings.Fields(line)
		switch {
		case line == "Latency Distribution":
			inDist = true
			continue
		case inDist && len(f) == 2 && pct[f[0]] != nil:
			d, err := parseWrkTime(f[1])
			if err != nil {
				return r, fmt.Errorf("wrk latency %s: %w", f[0], err)
			}
			*pct[f[0]] = d
			seen[f[0]] = true
			continue
		}
		inDist = false
		switch {
		case len(f) >= 6 && f[1] == "requests" && f[2] == "in" && f[5] == "read":
			// "37543 requests in 1.10s, 40.89MB read"
			n, err := strconv.ParseInt(f[0], 10, 64)
			if err != nil {
				return r, fmt.Errorf("wrk request total %q: %w", f[0], err)
			}
			el, err := parseWrkTime(strings.TrimSuffix(f[3], ","))
			if err != nil {
				return r, fmt.Errorf("wrk elapsed time: %w", err)
			}
			b, err := parseWrkBytes(f[4])
			if err != nil {
				return r, fmt.Errorf("wrk bytes read: %w", err)
			}
			r.Requests, r.Elapsed, r.BytesRead, haveTotal = n, el, b, true
		case len(f) == 2 && f[0] == "Requests/sec:":
			v, err := strconv.ParseFloat(f[1], 64)
			if err != nil {
				return r, fmt.Errorf("wrk Requests/sec %q: %w", f[1], err)
			}
			r.RequestsSec, haveRPS = v, true
		case len(f) == 2 && f[0] == "Transfer/sec:":
			v, err := parseWrkBytes(f[1])
			if err != nil {
				return r, fmt.Errorf("wrk Transfer/sec: %w", err)
			}
			r.BytesSec, haveBPS = v, true
		case strings.HasPrefix(line, "Socket errors:"):
			// "Socket errors: connect 0, read 3, write 0, timeout 0"
			dst := map[string]*int64{"connect": &r.ConnectErrors, "read": &r.ReadErrors, "write": &r.WriteErrors, "timeout": &r.Timeouts}
			rest := strings.Fields(strings.ReplaceAll(strings.TrimPrefix(line, "Socket errors:"), ",", ""))
			if len(rest) != 8 {
				return r, fmt.Errorf("wrk socket errors line %q: want four name/count pairs", line)
			}
			for i := 0; i < len(rest); i += 2 {
				p := dst[rest[i]]
				if p == nil {
					return r, fmt.Errorf("wrk socket errors line %q: unknown kind %q", line, rest[i])
				}
				v, err := strconv.ParseInt(rest[i+1], 10, 64)
				if err != nil {
					return r, fmt.Errorf("wrk socket errors line %q: %w", line, err)
				}
				*p = v
			}
		case strings.HasPrefix(line, "Non-2xx or 3xx responses:"):
			v, err := strconv.ParseInt(strings.TrimSpace(strings.TrimPrefix(line, "Non-2xx or 3xx responses:")), 10, 64)
			if err != nil {
				return r, fmt.Errorf("wrk non-2xx line %q: %w", line, err)
			}
			r.Non2xx3xx = v
		}
	}
	var missing []string
	if !haveTotal {
		missing = append(missing, `"N requests in T, B read"`)
	}
	if !haveRPS {
		missing = append(missing, "Requests/sec")
	}
	if !haveBPS {
		missing = append(missing, "Transfer/sec")
	}
	for _, p := range []string{"50%", "75%", "90%", "99%"} {
		if !seen[p] {
			missing = append(missing, "latency "+p)
		}
	}
	if len(missing) > 0 {
		return r, fmt.Errorf("wrk output lacks %s (did wrk fail, or run without --latency?)", strings.Join(missing, ", "))
	}
	return r, nil
}

// wrkTimeUnits are the suffixes wrk prints times with, longest first so
// "ms" is not taken for "s".
var wrkTimeUnits = []struct {
	suffix string
	unit   time.Duration
}{{"us", time.Microsecond}, {"ms", time.Millisecond}, {"m", time.Minute}, {"h", time.Hour}, {"s", time.Second}}

// parseWrkTime reads "95.00us", "1.17ms", "2.00s", "1.50m".
func parseWrkTime(s string) (time.Duration, error) {
	for _, u := range wrkTimeUnits {
		num, ok := strings.CutSuffix(s, u.suffix)
		if !ok {
			continue
		}
		v, err := strconv.ParseFloat(num, 64)
		if err != nil || v < 0 {
			return 0, fmt.Errorf("time %q: want a non-negative number before %q", s, u.suffix)
		}
		return time.Duration(math.Round(v * float64(u.unit))), nil
	}
	return 0, fmt.Errorf("time %q: want a number with us, ms, s, m or h", s)
}

// parseWrkBytes reads wrk's binary-prefixed sizes ("40.89MB", "512.00B",
// "1.02GB"); wrk divides by 1024 per prefix.
func parseWrkBytes(s string) (float64, error) {
	num, ok := strings.CutSuffix(s, "B")
	if !ok {
		return 0, fmt.Errorf("size %q: want a number ending in B", s)
	}
	scale := 1.0
	for i, p := range []string{"K", "M", "G", "T", "P"} {
		if n, ok := strings.CutSuffix(num, p); ok {
			num = n
			for range i + 1 {
				scale *= 1024
			}
			break
		}
	}
	v, err := strconv.ParseFloat(num, 64)
	if err != nil || v < 0 {
		return 0, fmt.Errorf("size %q: want a non-negative number with an optional K, M, G, T or P before the B", s)
	}
	return v * scale, nil
}
