package main

import (
	"bytes"
	"encoding/xml"
	"errors"
	"io"
	"math"
	"strconv"
	"strings"
	"testing"
)

func testChart() Chart {
	return Chart{
		Title: "req/s <A→B>", XLabel: "connections", YLabel: "requests/s", LogX: true,
		Series: []Series{
			{Name: "iptables", Points: []Point{{X: 64, Y: 22000, Lo: 21000, Hi: 23000}, {X: 1, Y: 8000, Lo: 8000, Hi: 8000}, {X: 8, Y: 22900, Lo: 22000, Hi: 24000}}},
			{Name: "meshlane & co", Points: []Point{{X: 1, Y: 14000, Lo: 13000, Hi: 15000}, {X: 8, Y: 38000, Lo: 37000, Hi: 39000}, {X: 64, Y: 40000, Lo: 39000, Hi: 41000}}},
		},
	}
}

// svgDoc is what the test reads back out of a rendered chart.
type svgDoc struct {
	texts     []string
	polylines [][][2]float64 // per series, the points in drawing order
	names     []string       // data-name of each series group
}

func parseSVG(t *testing.T, b []byte) svgDoc {
	t.Helper()
	var doc svgDoc
	dec := xml.NewDecoder(bytes.NewReader(b))
	inText := false
	root := true
	for {
		tok, err := dec.Token()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("chart is not well-formed XML: %v\n%s", err, b)
		}
		switch el := tok.(type) {
		case xml.StartElement:
			if root {
				if el.Name.Local != "svg" || el.Name.Space != "http://www.w3.org/2000/svg" {
					t.Fatalf("root element %v, want svg in the SVG namespace", el.Name)
				}
				root = false
			}
			attr := func(name string) string {
				for _, a := range el.Attr {
					if a.Name.Local == name {
						return a.Value
					}
				}
				return ""
			}
			switch el.Name.Local {
			case "text":
				inText = true
				doc.texts = append(doc.texts, "")
			case "g":
				doc.names = append(doc.names, attr("data-name"))
			case "polyline":
				var pts [][2]float64
				for pair := range strings.FieldsSeq(attr("points")) {
					xs, ys, ok := strings.Cut(pair, ",")
					x, err1 := strconv.ParseFloat(xs, 64)
					y, err2 := strconv.ParseFloat(ys, 64)
					if !ok || err1 != nil || err2 != nil {
						t.Fatalf("polyline point %q", pair)
					}
					pts = append(pts, [2]float64{x, y})
				}
				doc.polylines = append(doc.polylines, pts)
			}
		case xml.CharData:
			if inText {
				doc.texts[len(doc.texts)-1] += string(el)
			}
		case xml.EndElement:
			if el.Name.Local == "text" {
				inText = false
			}
		}
	}
	return doc
}

func TestChartSVG(t *testing.T) {
	b, err := testChart().SVG()
	if err != nil {
		t.Fatal(err)
	}
	doc := parseSVG(t, b)
	texts := strings.Join(doc.texts, "\n")
	// Title, axis labels and legend entries are there, escaped on the
	// way in and intact on the way out.
	for _, want := range []string{"req/s <A→B>", "connections", "requests/s", "iptables", "meshlane & co", "1", "8", "64"} {
		if !strings.Contains("\n"+texts+"\n", "\n"+want+"\n") {
			t.Errorf("no text %q in chart; texts:\n%s", want, texts)
		}
	}
	if len(doc.polylines) != 2 || len(doc.names) != 2 || doc.names[0] != "iptables" || doc.names[1] != "meshlane & co" {
		t.Fatalf("series groups %q with %d lines, want iptables and meshlane & co", doc.names, len(doc.polylines))
	}
	ipt, ml := doc.polylines[0], doc.polylines[1]
	if len(ipt) != 3 || len(ml) != 3 {
		t.Fatalf("points per line %d, %d; want 3", len(ipt), len(ml))
	}
	// Points are drawn left to right by x, whatever order they came in,
	// and a log axis spaces 1, 8, 64 evenly.
	if !(ipt[0][0] < ipt[1][0] && ipt[1][0] < ipt[2][0]) {
		t.Fatalf("iptables x positions %v not increasing", ipt)
	}
	if d1, d2 := ipt[1][0]-ipt[0][0], ipt[2][0]-ipt[1][0]; math.Abs(d1-d2) > 0.2 {
		t.Fatalf("log x axis: 1→8 spans %.1f, 8→64 spans %.1f; want equal", d1, d2)
	}
	// Same x, same position; a larger y is higher up (smaller SVG y).
	for i := range ipt {
		if ipt[i][0] != ml[i][0] {
			t.Fatalf("point %d: x %.1f vs %.1f", i, ipt[i][0], ml[i][0])
		}
		if ml[i][1] >= ipt[i][1] {
			t.Fatalf("point %d: meshlane (larger) at y %.1f, iptables at %.1f", i, ml[i][1], ipt[i][1])
		}
	}
	// Every point sits inside the plot area.
	for _, line := range doc.polylines {
		for _, p := range line {
			if p[0] <= plotLeft || p[0] >= plotRight || p[1] < plotTop || p[1] > plotBottom {
				t.Fatalf("point %v outside the plot area", p)
			}
		}
	}
	// Spread bars are drawn for points with a spread only: 5 of the 6.
	if n := bytes.Count(b, []byte("<path ")); n != 5 {
		t.Fatalf("%d spread bars, want 5", n)
	}
}

func TestChartRejects(t *testing.T) {
	for name, c := range map[string]Chart{
		"no series":   {Title: "x"},
		"empty line":  {Series: []Series{{Name: "a"}}},
		"nan":         {Series: []Series{{Name: "a", Points: []Point{{X: 1, Y: math.NaN()}}}}},
		"zero on log": {LogX: true, Series: []Series{{Name: "a", Points: []Point{{X: 0, Y: 1, Lo: 1, Hi: 1}}}}},
		"lo above y":  {Series: []Series{{Name: "a", Points: []Point{{X: 1, Y: 1, Lo: 2, Hi: 2}}}}},
	} {
		if _, err := c.SVG(); err == nil {
			t.Errorf("%s: SVG() succeeded, want an error", name)
		}
	}
}

func TestNiceTicks(t *testing.T) {
	for _, tc := range []struct{ max, step, top float64 }{
		{40000, 10000, 40000},
		{41000, 10000, 50000},
		{23, 5, 25},
		{0.7, 0.2, 0.8},
		{0, 1, 1},
	} {
		step, top := niceTicks(tc.max)
		if math.Abs(step-tc.step) > 1e-9 || math.Abs(top-tc.top) > 1e-9 {
			t.Errorf("niceTicks(%g) = %g, %g; want %g, %g", tc.max, step, top, tc.step, tc.top)
		}
	}
}

func TestHumanNumber(t *testing.T) {
	for in, want := range map[float64]string{0: "0", 8: "8", 64: "64", 250: "250", 12500: "12.5k", 40000: "40k", 1.25e6: "1.3M", 0.25: "0.25"} {
		if got := humanNumber(in); got != want {
			t.Errorf("humanNumber(%g) = %q, want %q", in, got, want)
		}
	}
}

// On a log y axis equal ratios take equal heights and the ticks name the
// decades.
func TestChartLogY(t *testing.T) {
	c := Chart{Title: "p99", XLabel: "x", YLabel: "µs", LogY: true, Series: []Series{
		{Name: "a", Points: []Point{{X: 1, Y: 100, Lo: 100, Hi: 100}, {X: 2, Y: 1000, Lo: 1000, Hi: 1000}, {X: 3, Y: 10000, Lo: 10000, Hi: 10000}}},
	}}
	b, err := c.SVG()
	if err != nil {
		t.Fatal(err)
	}
	doc := parseSVG(t, b)
	texts := "\n" + strings.Join(doc.texts, "\n") + "\n"
	for _, want := range []string{"100", "200", "500", "1k", "10k"} {
		if !strings.Contains(texts, "\n"+want+"\n") {
			t.Errorf("no tick %q on the log axis; texts:%s", want, texts)
		}
	}
	pts := doc.polylines[0]
	if d1, d2 := pts[0][1]-pts[1][1], pts[1][1]-pts[2][1]; d1 <= 0 || math.Abs(d1-d2) > 0.2 {
		t.Fatalf("100→1000 rises %.1f, 1000→10000 rises %.1f; want equal and positive", d1, d2)
	}
	c.Series[0].Points[0].Lo = 0
	if _, err := c.SVG(); err == nil {
		t.Fatal("a zero on a log y axis was drawn")
	}
}
