package main

import (
	"errors"
	"fmt"
	"path/filepath"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
)

// charts draws the loss windows of the crash trials, one column of points per shipper
// on a log scale, and the catch-up throughput as bars.
// charts draws each chart whose scenario ran.
func (r *results) charts(dir string) error {
	for name, draw := range map[string]func(string) error{"loss-window.png": r.lossChart, "throughput.png": r.throughputChart} {
		if err := draw(filepath.Join(dir, name)); err != nil && !errors.Is(err, errNoData) {
			return err
		}
	}
	return nil
}

func (r *results) lossChart(path string) error {
	kinds := []string{walshipDrain, walshipLiveDrain, walshipLost, receivewal, archive5, archive60}
	p := plot.New()
	p.Title.Text = "Loss window in crash trials (kill time minus the newest surviving ack)"
	p.Y.Label.Text = "window, ms (log scale; 0 and below drawn at 0.01)"
	p.Y.Scale = plot.LogScale{}
	p.Y.Tick.Marker = plot.LogTicks{Prec: -1}
	var names []string
	for i, kind := range kinds {
		_, window := r.trialsOf(kind)
		if len(window) == 0 {
			continue
		}
		pts := make(plotter.XYs, len(window))
		for j, w := range window {
			pts[j].X = float64(len(names)) + 0.15*(float64(j%5)-2)/2
			pts[j].Y = max(w, 0.01)
		}
		s, err := plotter.NewScatter(pts)
		if err != nil {
			return err
		}
		s.GlyphStyle.Color = plotter.DefaultLineStyle.Color
		s.GlyphStyle.Radius = vg.Points(3)
		s.GlyphStyle.Shape = shapes[i%len(shapes)]
		p.Add(s)
		names = append(names, kind)
	}
	if len(names) == 0 {
		return errNoData
	}
	p.NominalX(names...)
	p.X.Tick.Label.Rotation = 0.3
	p.X.Tick.Label.XAlign = -0.5
	return p.Save(10*vg.Inch, 5*vg.Inch, path)
}

func (r *results) throughputChart(path string) error {
	var vals plotter.Values
	var names []string
	for _, kind := range []string{walshipName, receivewal} {
		var rate []float64
		for _, cr := range r.catchup {
			if cr.kind == kind {
				rate = append(rate, cr.mib/cr.secs)
			}
		}
		if len(rate) == 0 {
			continue
		}
		m, _, _ := median(rate)
		vals = append(vals, m)
		names = append(names, kind)
	}
	var dd []float64
	for _, cr := range r.catchup {
		dd = append(dd, cr.ddMBs*1e6/(1<<20))
	}
	if len(dd) > 0 {
		m, _, _ := median(dd)
		vals = append(vals, m)
		names = append(names, "dd conv=fdatasync")
	}
	if len(vals) == 0 {
		return errNoData
	}
	p := plot.New()
	p.Title.Text = "Catch-up throughput, median over the rounds"
	p.Y.Label.Text = "MiB/s"
	bars, err := plotter.NewBarChart(vals, vg.Points(40))
	if err != nil {
		return err
	}
	p.Add(bars)
	p.NominalX(names...)
	labels, err := plotter.NewLabels(plotter.XYLabels{XYs: barTops(vals), Labels: barLabels(vals)})
	if err != nil {
		return err
	}
	p.Add(labels)
	return p.Save(7*vg.Inch, 4*vg.Inch, path)
}

func barTops(vals plotter.Values) plotter.XYs {
	xys := make(plotter.XYs, len(vals))
	for i, v := range vals {
		xys[i].X, xys[i].Y = float64(i), v
	}
	return xys
}

func barLabels(vals plotter.Values) []string {
	out := make([]string, len(vals))
	for i, v := range vals {
		out[i] = fmt.Sprintf("%.0f", v)
	}
	return out
}

var shapes = []draw.GlyphDrawer{draw.CircleGlyph{}, draw.CrossGlyph{}, draw.TriangleGlyph{}, draw.SquareGlyph{}, draw.PlusGlyph{}}
