package bench

import (
	"bytes"
	"encoding/xml"
	"fmt"
	"math"
	"strings"
)

// fmtValue prints a figure value with sensible precision.
func fmtValue(v float64) string {
	switch a := math.Abs(v); {
	case a >= 100000:
		return fmt.Sprintf("%.0fk", v/1000)
	case a >= 10000:
		return fmt.Sprintf("%.1fk", v/1000)
	case a >= 100:
		return fmt.Sprintf("%.0f", v)
	case a >= 10:
		return fmt.Sprintf("%.1f", v)
	default:
		return fmt.Sprintf("%.2f", v)
	}
}

// Markdown renders the results as tables: every figure by path (median and
// min–max), then each path's ratios to kernel VXLAN and raw.
func (r *Results) Markdown() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%d nodes, %d rounds × %gs per run, %d-stream TCP, underlay MTU %d", r.Config.Nodes, r.Config.Rounds, r.Config.DurationSeconds, r.Config.Streams, r.Config.MTU)
	if r.Config.NetemDelayMS > 0 || r.Config.NetemLossPct > 0 {
		fmt.Fprintf(&b, ", netem delay %gms loss %g%%", r.Config.NetemDelayMS, r.Config.NetemLossPct)
	}
	if r.Config.Wire {
		b.WriteString(", wire-like underlay (TSO/GSO/USO off)")
	} else {
		b.WriteString(", veth as is (GSO super-packets cross whole)")
	}
	if r.Config.LossPct > 0 {
		fmt.Fprintf(&b, ", %g%% random loss per link (nftables)", r.Config.LossPct)
	}
	if len(r.Config.TulledArgs) > 0 {
		fmt.Fprintf(&b, ", tulled %s", strings.Join(r.Config.TulledArgs, " "))
	}
	fmt.Fprintf(&b, "; %d CPUs, Linux %s, %s.\n\n", r.Host.CPUs, r.Host.Kernel, r.Host.GoVersion)
	if !r.Complete {
		b.WriteString("**Incomplete run**: the figures below cover the rounds that finished.\n\n")
	}
	b.WriteString("| figure |")
	for _, p := range r.Paths {
		fmt.Fprintf(&b, " %s |", p.Name)
	}
	b.WriteString("\n|---|")
	for range r.Paths {
		b.WriteString("---|")
	}
	b.WriteString("\n| inner MTU (bytes) |")
	for _, p := range r.Paths {
		if p.InnerMTU > 0 {
			fmt.Fprintf(&b, " %d |", p.InnerMTU)
		} else {
			b.WriteString(" – |")
		}
	}
	b.WriteString("\n")
	for _, f := range r.Figures {
		if !r.has(f.Key) {
			continue
		}
		fmt.Fprintf(&b, "| %s (%s) |", f.Title, f.Unit)
		for _, p := range r.Paths {
			if s, ok := p.Figures[f.Key]; ok {
				fmt.Fprintf(&b, " %s (%s–%s) |", fmtValue(s.Median), fmtValue(s.Min), fmtValue(s.Max))
			} else {
				b.WriteString(" – |")
			}
		}
		b.WriteString("\n")
	}
	ratioFigs := []string{FigTCP1, FigTCPN, FigUDP64PPS, FigUDP1400PPS, FigRTTP50, FigLoadedP50}
	b.WriteString("\nRatios (per round, median and min–max):\n\n| path |")
	for _, k := range ratioFigs {
		fmt.Fprintf(&b, " %s × VXLAN | × raw |", r.title(k))
	}
	b.WriteString("\n|---|")
	for range ratioFigs {
		b.WriteString("---|---|")
	}
	b.WriteString("\n")
	for _, p := range r.Paths {
		fmt.Fprintf(&b, "| %s |", p.Name)
		for _, k := range ratioFigs {
			for _, m := range []map[string]Stat{p.VsKernelVXLAN, p.VsRaw} {
				if s, ok := m[k]; ok {
					fmt.Fprintf(&b, " %.2f (%.2f–%.2f) |", s.Median, s.Min, s.Max)
				} else {
					b.WriteString(" – |")
				}
			}
		}
		b.WriteString("\n")
	}
	wgFigs := []string{FigTCP1, FigTCPN, FigUDP1400PPS, FigRTTP50, FigLoadedP50, FigCPUTulled, FigRSS}
	for _, p := range r.Paths {
		if p.Name != PathTulleWireGuard || len(p.VsWireGuardGo) == 0 {
			continue
		}
		b.WriteString("\nRatios to the stock wireguard-go (per round, median and min–max; CPU and RSS: the daemons'):\n\n| path |")
		for _, k := range wgFigs {
			fmt.Fprintf(&b, " %s |", r.title(k))
		}
		b.WriteString("\n|---|" + strings.Repeat("---|", len(wgFigs)) + "\n| " + p.Name + " |")
		for _, k := range wgFigs {
			if s, ok := p.VsWireGuardGo[k]; ok {
				fmt.Fprintf(&b, " %.2f (%.2f–%.2f) |", s.Median, s.Min, s.Max)
			} else {
				b.WriteString(" – |")
			}
		}
		b.WriteString("\n")
	}
	return b.String()
}

func (r *Results) has(fig string) bool {
	for _, p := range r.Paths {
		if _, ok := p.Figures[fig]; ok {
			return true
		}
	}
	return false
}

func (r *Results) title(fig string) string {
	for _, f := range r.Figures {
		if f.Key == fig {
			return f.Title
		}
	}
	return fig
}

// pathColors are the bar colours, by path position.
var pathColors = []string{"#8c8c8c", "#4e79a7", "#e15759", "#f28e2b", "#76b7b2", "#59a14f", "#edc948", "#b07aa1"}

// SVG renders one small bar chart per figure: a bar per path at the median
// with a whisker from min to max.
func (r *Results) SVG() []byte {
	const (
		panelW       = 420
		cols         = 2
		top          = 60
		plotL, plotR = 150, 70 // label column, value column
		barH, barGap = 16, 8
	)
	var figs []FigureInfo
	for _, f := range r.Figures {
		if r.has(f.Key) {
			figs = append(figs, f)
		}
	}
	panelH := 60 + len(r.Paths)*(barH+barGap)
	rows := (len(figs) + cols - 1) / cols
	w, h := cols*panelW+20, top+rows*panelH+10
	var b bytes.Buffer
	esc := func(s string) string {
		var e bytes.Buffer
		xml.EscapeText(&e, []byte(s))
		return e.String()
	}
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="12">`+"\n", w, h, w, h)
	fmt.Fprintf(&b, `<rect width="%d" height="%d" fill="white"/>`+"\n", w, h)
	fmt.Fprintf(&b, `<text x="10" y="22" font-size="16" font-weight="bold">tulle bench: median with min–max whiskers, %d rounds</text>`+"\n", r.Config.Rounds)
	fmt.Fprintf(&b, `<text x="10" y="42" fill="#555">%s</text>`+"\n", esc(fmt.Sprintf("%d nodes, %gs per run, %d CPUs, Linux %s", r.Config.Nodes, r.Config.DurationSeconds, r.Host.CPUs, r.Host.Kernel)))
	for i, f := range figs {
		x0 := 10 + (i%cols)*panelW
		y0 := top + (i/cols)*panelH
		fmt.Fprintf(&b, `<g transform="translate(%d,%d)">`+"\n", x0, y0)
		better := "lower is better"
		if f.HigherIsBetter {
			better = "higher is better"
		}
		fmt.Fprintf(&b, `<text x="0" y="14" font-weight="bold">%s</text><text x="0" y="30" fill="#777" font-size="11">%s, %s</text>`+"\n", esc(f.Title), esc(f.Unit), better)
		var maxV float64
		for _, p := range r.Paths {
			if s, ok := p.Figures[f.Key]; ok {
				maxV = max(maxV, s.Max)
			}
		}
		if maxV <= 0 {
			maxV = 1
		}
		plotW := float64(panelW - plotL - plotR - 10)
		scale := func(v float64) float64 { return float64(plotL) + plotW*math.Max(v, 0)/maxV }
		y := 42
		for pi, p := range r.Paths {
			s, ok := p.Figures[f.Key]
			fmt.Fprintf(&b, `<text x="%d" y="%d" text-anchor="end">%s</text>`, plotL-6, y+barH-4, esc(p.Name))
			if !ok {
				fmt.Fprintf(&b, `<text x="%d" y="%d" fill="#999">n/a</text>`+"\n", plotL, y+barH-4)
				y += barH + barGap
				continue
			}
			color := pathColors[pi%len(pathColors)]
			fmt.Fprintf(&b, `<rect x="%d" y="%d" width="%.1f" height="%d" fill="%s"/>`, plotL, y, scale(s.Median)-float64(plotL), barH, color)
			mid := float64(y) + barH/2
			fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="black"/>`, scale(s.Min), mid, scale(s.Max), mid)
			for _, v := range []float64{s.Min, s.Max} {
				fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="black"/>`, scale(v), mid-5, scale(v), mid+5)
			}
			fmt.Fprintf(&b, `<text x="%.1f" y="%d">%s</text>`+"\n", scale(maxV)+6, y+barH-4, esc(fmtValue(s.Median)))
			y += barH + barGap
		}
		b.WriteString("</g>\n")
	}
	b.WriteString("</svg>\n")
	return b.Bytes()
}
