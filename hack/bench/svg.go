package main

import (
	"bytes"
	"encoding/xml"
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
)

// Chart is a line chart: one line per series, points with an optional
// spread bar (Lo to Hi), labelled axes and a legend. It renders to a
// self-contained SVG so the report needs no plotting library.
type Chart struct {
	Title, XLabel, YLabel string
	// LogX spaces the x axis by log2 (connection counts 1, 8, 64); LogY
	// the y axis by log10 (latencies spanning decades).
	LogX, LogY bool
	Series     []Series
}

// Series is one line of a chart.
type Series struct {
	Name   string
	Points []Point
}

// Point is a value and its spread; Lo == Hi == Y draws no bar.
type Point struct {
	X, Y, Lo, Hi float64
}

// Chart geometry in SVG user units.
const (
	svgWidth    = 760
	svgHeight   = 440
	plotLeft    = 80
	plotTop     = 50
	plotRight   = 560 // the legend sits to the right of the plot
	plotBottom  = 370
	legendX     = 580
	legendLineH = 22
)

// palette holds distinguishable colours, also in grey print.
var palette = []string{"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"}

// SVG renders the chart.
func (c Chart) SVG() ([]byte, error) {
	if len(c.Series) == 0 {
		return nil, errors.New("chart: no series to draw")
	}
	var xs []float64
	yMax, yMin := 0.0, math.Inf(1)
	for _, s := range c.Series {
		if len(s.Points) == 0 {
			return nil, fmt.Errorf("chart: series %q has no points", s.Name)
		}
		for _, p := range s.Points {
			for _, v := range []float64{p.X, p.Y, p.Lo, p.Hi} {
				if math.IsNaN(v) || math.IsInf(v, 0) {
					return nil, fmt.Errorf("chart: series %q has a non-finite value", s.Name)
				}
			}
			if p.Y < 0 || p.Lo > p.Y || p.Hi < p.Y {
				return nil, fmt.Errorf("chart: series %q point at x=%g: want 0 <= lo <= y <= hi, have %g, %g, %g", s.Name, p.X, p.Lo, p.Y, p.Hi)
			}
			if c.LogX && p.X <= 0 {
				return nil, fmt.Errorf("chart: series %q has x=%g on a log axis", s.Name, p.X)
			}
			if c.LogY && p.Lo <= 0 {
				return nil, fmt.Errorf("chart: series %q has y=%g on a log axis", s.Name, p.Lo)
			}
			xs = append(xs, p.X)
			yMax, yMin = max(yMax, p.Hi), min(yMin, p.Lo)
		}
	}
	slices.Sort(xs)
	xs = slices.Compact(xs)

	xPos := func(x float64) float64 {
		lo, hi := xs[0], xs[len(xs)-1]
		if c.LogX {
			x, lo, hi = math.Log2(x), math.Log2(lo), math.Log2(hi)
		}
		if hi == lo {
			return (plotLeft + plotRight) / 2
		}
		// Keep a margin so points never sit on the axes.
		const pad = 30
		return plotLeft + pad + (x-lo)/(hi-lo)*(plotRight-plotLeft-2*pad)
	}
	yTicks, yPos := linearAxis(yMax)
	if c.LogY {
		yTicks, yPos = logAxis(yMin, yMax)
	}

	var b bytes.Buffer
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="13">`+"\n",
		svgWidth, svgHeight, svgWidth, svgHeight)
	fmt.Fprintf(&b, `<rect width="%d" height="%d" fill="white"/>`+"\n", svgWidth, svgHeight)
	text(&b, svgWidth/2, 28, "middle", "font-size=\"16\" font-weight=\"bold\"", c.Title)

	// Grid and y ticks.
	for _, y := range yTicks {
		py := yPos(y)
		fmt.Fprintf(&b, `<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#ddd"/>`+"\n", plotLeft, py, plotRight, py)
		text(&b, plotLeft-8, py+4, "end", "", humanNumber(y))
	}
	// x ticks at the measured x values.
	for _, x := range xs {
		px := xPos(x)
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="black"/>`+"\n", px, plotBottom, px, plotBottom+5)
		text(&b, px, plotBottom+20, "middle", "", humanNumber(x))
	}
	// Axes and their labels.
	fmt.Fprintf(&b, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="black"/>`+"\n", plotLeft, plotBottom, plotRight, plotBottom)
	fmt.Fprintf(&b, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="black"/>`+"\n", plotLeft, plotTop, plotLeft, plotBottom)
	text(&b, (plotLeft+plotRight)/2, plotBottom+45, "middle", "", c.XLabel)
	text(&b, 0, 0, "middle", fmt.Sprintf(`transform="translate(22 %d) rotate(-90)"`, (plotTop+plotBottom)/2), c.YLabel)

	for i, s := range c.Series {
		color := palette[i%len(palette)]
		pts := slices.Clone(s.Points)
		slices.SortFunc(pts, func(a, b Point) int { return cmpFloat(a.X, b.X) })
		var line bytes.Buffer
		for j, p := range pts {
			if j > 0 {
				line.WriteByte(' ')
			}
			fmt.Fprintf(&line, "%.1f,%.1f", xPos(p.X), yPos(p.Y))
		}
		fmt.Fprintf(&b, `<g class="series" data-name="%s">`+"\n", escape(s.Name))
		fmt.Fprintf(&b, `<polyline fill="none" stroke="%s" stroke-width="2" points="%s"/>`+"\n", color, line.String())
		for _, p := range pts {
			px := xPos(p.X)
			if p.Hi > p.Lo {
				fmt.Fprintf(&b, `<path d="M%.1f %.1fV%.1fM%.1f %.1fH%.1fM%.1f %.1fH%.1f" stroke="%s"/>`+"\n",
					px, yPos(p.Lo), yPos(p.Hi), px-4, yPos(p.Lo), px+4, px-4, yPos(p.Hi), px+4, color)
			}
			fmt.Fprintf(&b, `<circle cx="%.1f" cy="%.1f" r="3.5" fill="%s"><title>%s: %s at %s</title></circle>`+"\n",
				px, yPos(p.Y), color, escape(s.Name), humanNumber(p.Y), humanNumber(p.X))
		}
		b.WriteString("</g>\n")
		// Legend entry.
		ly := float64(plotTop + 10 + i*legendLineH)
		fmt.Fprintf(&b, `<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="%s" stroke-width="3"/>`+"\n", legendX, ly, legendX+24, ly, color)
		text(&b, legendX+30, ly+4, "start", "", s.Name)
	}
	text(&b, legendX, float64(plotTop+20+len(c.Series)*legendLineH), "start", `font-size="11" fill="#555"`, "bars: min to max")
	b.WriteString("</svg>\n")
	return b.Bytes(), nil
}

func text(b *bytes.Buffer, x, y float64, anchor, attrs, s string) {
	fmt.Fprintf(b, `<text x="%.1f" y="%.1f" text-anchor="%s" %s>%s</text>`+"\n", x, y, anchor, attrs, escape(s))
}

func escape(s string) string {
	var b bytes.Buffer
	// EscapeText only fails on a failing writer; a bytes.Buffer never fails.
	xml.EscapeText(&b, []byte(s))
	return b.String()
}

func cmpFloat(a, b float64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// linearAxis returns the y ticks from 0 up to past maxV and the mapping
// of values to SVG y.
func linearAxis(maxV float64) ([]float64, func(float64) float64) {
	step, top := niceTicks(maxV)
	var ticks []float64
	for i := 0.0; i*step <= top+step/2; i++ {
		ticks = append(ticks, i*step)
	}
	return ticks, func(y float64) float64 { return plotBottom - y/top*(plotBottom-plotTop) }
}

// logAxis spans whole decades around minV..maxV, with ticks at 1, 2 and 5
// times each power of ten.
func logAxis(minV, maxV float64) ([]float64, func(float64) float64) {
	lo, hi := math.Floor(math.Log10(minV)), math.Ceil(math.Log10(maxV))
	if hi == lo {
		hi++
	}
	var ticks []float64
	for d := lo; d <= hi; d++ {
		for _, m := range []float64{1, 2, 5} {
			if v := m * math.Pow(10, d); v <= math.Pow(10, hi)*(1+1e-9) {
				ticks = append(ticks, v)
			}
		}
	}
	return ticks, func(y float64) float64 {
		return plotBottom - (math.Log10(y)-lo)/(hi-lo)*(plotBottom-plotTop)
	}
}

// niceTicks picks a tick step of 1, 2 or 5 times a power of ten giving
// about five ticks, and the axis top: the first tick at or above max.
func niceTicks(maxV float64) (step, top float64) {
	if maxV <= 0 {
		return 1, 1
	}
	raw := maxV / 5
	pow := math.Pow(10, math.Floor(math.Log10(raw)))
	step = 10 * pow
	for _, m := range []float64{1, 2, 5} {
		if m*pow >= raw {
			step = m * pow
			break
		}
	}
	return step, math.Ceil(maxV/step-1e-9) * step
}

// humanNumber shortens tick and tooltip labels: 12500 is "12.5k".
func humanNumber(v float64) string {
	abs := math.Abs(v)
	switch {
	case abs >= 1e6:
		return strconv.FormatFloat(math.Round(v/1e5)/10, 'f', -1, 64) + "M"
	case abs >= 1e3:
		return strconv.FormatFloat(math.Round(v/1e2)/10, 'f', -1, 64) + "k"
	case abs >= 10 || v == math.Trunc(v):
		return strconv.FormatFloat(math.Round(v), 'f', -1, 64)
	}
	return strconv.FormatFloat(v, 'g', 3, 64)
}
