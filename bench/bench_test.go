package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"encoding/xml"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tulle-net/tulle/internal/tstest/testenv"
)

func TestParseIperf3Fixtures(t *testing.T) {
	tests := []struct {
		file     string
		proto    string
		gbps     float64 // TCP
		pps      float64 // UDP received packets/s
		loss     float64
		streams  int
		parseErr string
	}{
		{file: "iperf3-tcp-1stream.json", proto: "TCP", gbps: 14.653, streams: 1},
		{file: "iperf3-tcp-4streams.json", proto: "TCP", gbps: 18.276, streams: 4},
		{file: "iperf3-udp-64.json", proto: "UDP", pps: (247260 - 2488) / 1.000114, loss: 1.006, streams: 1},
		{file: "iperf3-udp-1400.json", proto: "UDP", pps: (237170 - 711) / 1.00009, loss: 0.2998, streams: 1},
		{file: "iperf3-refused.json", parseErr: "Connection refused"},
	}
	near := func(a, b float64) bool { return a-b < 0.001*max(1, b) && b-a < 0.001*max(1, b) }
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			b, err := os.ReadFile(filepath.Join("testdata", tt.file))
			if err != nil {
				t.Fatal(err)
			}
			r, err := ParseIperf3(b)
			if tt.parseErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.parseErr) {
					t.Fatalf("ParseIperf3 = %v, want an error with %q", err, tt.parseErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if r.Start.TestStart.Protocol != tt.proto || r.Start.TestStart.NumStreams != tt.streams {
				t.Errorf("test_start = %+v", r.Start.TestStart)
			}
			if tt.proto == "TCP" && !near(r.Gbps(), tt.gbps) {
				t.Errorf("Gbps = %.4f, want %.4f", r.Gbps(), tt.gbps)
			}
			if tt.proto == "UDP" && (!near(r.ReceivedPPS(), tt.pps) || !near(r.LossPercent(), tt.loss)) {
				t.Errorf("pps %.1f loss %.4f, want %.1f %.4f", r.ReceivedPPS(), r.LossPercent(), tt.pps, tt.loss)
			}
		})
	}
	for _, bad := range []string{`{}`, `not json`, `{"start":{"test_start":{"protocol":"UDP"}},"end":{"sum":{"packets":5,"lost_packets":5}}}`} {
		if _, err := ParseIperf3([]byte(bad)); err == nil {
			t.Errorf("ParseIperf3(%s) succeeded", bad)
		}
	}
}

func TestIperf3Args(t *testing.T) {
	tcp := iperf3Run{Dst: mustAddr("100.64.0.2"), Port: 5201, Duration: 10 * time.Second, Streams: 4}
	if got := strings.Join(tcp.args(), " "); got != "-c 100.64.0.2 -p 5201 -t 10 -J -P 4" {
		t.Errorf("tcp args = %q", got)
	}
	udp := iperf3Run{Dst: mustAddr("100.64.0.2"), Port: 5201, Duration: 1500 * time.Millisecond, UDPSize: 64}
	if got := strings.Join(udp.args(), " "); got != "-c 100.64.0.2 -p 5201 -t 2 -J -u -b 0 -l 64" {
		t.Errorf("udp args = %q", got)
	}
}

func sampleResults(t *testing.T) *Results {
	t.Helper()
	var s []Sample
	add := func(path, fig string, vals ...float64) {
		for r, v := range vals {
			s = append(s, Sample{Path: path, Figure: fig, Round: r, Value: v})
		}
	}
	add(PathRaw, FigTCP1, 10, 12, 11)
	add(PathKernelVXLAN, FigTCP1, 4, 10, 18) // ratios 1.0, 0.6, 0.5: round order is not sorted order
	add(PathTulleUDP, FigTCP1, 4, 6, 9)
	add(PathRaw, FigRTTP50, 20, 20, 20)
	add(PathKernelVXLAN, FigRTTP50, 25, 20, 20)
	add(PathTulleUDP, FigRTTP50, 100, 120, 140)
	add(PathTulleUDP, FigRSS, 20.5, 20.7, 20.8)
	paths := []string{PathRaw, PathKernelVXLAN, PathTulleUDP}
	pr, err := Summarize(s, paths)
	if err != nil {
		t.Fatal(err)
	}
	for i, mtu := range []int{1500, 1450, 1456} {
		pr[i].InnerMTU = mtu
	}
	return &Results{Schema: Schema, Host: Host{CPUs: 2, Kernel: "6.18"}, Figures: figureInfos(4, 0), Paths: pr, Complete: true,
		Config: Config{Nodes: 2, Paths: paths, Rounds: 3, DurationSeconds: 10, Streams: 4, MTU: 1500}}
}

func TestSummarize(t *testing.T) {
	r := sampleResults(t)
	if len(r.Paths) != 3 || r.Paths[2].Name != PathTulleUDP {
		t.Fatalf("paths out of order: %+v", r.Paths)
	}
	u := r.Paths[2]
	if s := u.Figures[FigTCP1]; s.Median != 6 || s.Min != 4 || s.Max != 9 || len(s.Samples) != 3 {
		t.Errorf("tcp1 = %+v", s)
	}
	// Per-round ratios 0.5, 0.6, 1.0: median 0.6, not 6/9.
	if s := u.VsKernelVXLAN[FigTCP1]; s.Median != 0.6 || s.Min != 0.5 || s.Max != 1.0 {
		t.Errorf("tcp1 vs VXLAN = %+v", s)
	}
	// Ratio samples pair with the figure samples: round order, not sorted.
	vx := r.Paths[1].Figures[FigTCP1].Samples
	for i, ratio := range u.VsKernelVXLAN[FigTCP1].Samples {
		if want := u.Figures[FigTCP1].Samples[i] / vx[i]; ratio != want {
			t.Errorf("ratio sample %d = %v, want round %d's %v", i, ratio, i, want)
		}
	}
	if s := u.VsRaw[FigRTTP50]; s.Median != 6 {
		t.Errorf("rtt vs raw = %+v, want median 6", s)
	}
	if _, ok := u.VsKernelVXLAN[FigRSS]; ok {
		t.Error("ratio for a figure the reference does not have")
	}
	if _, ok := r.Paths[0].Figures[FigRSS]; ok {
		t.Error("raw has a tulled RSS figure")
	}
	if _, err := Summarize(nil, nil); err == nil {
		t.Error("Summarize(nil) succeeded")
	}
	if got := percentile([]float64{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, 50); got != 5 {
		t.Errorf("p50 = %v, want 5", got)
	}
	if got := percentile([]float64{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, 99); got != 10 {
		t.Errorf("p99 = %v, want 10", got)
	}
	if got := machineBusy("cpu  100 5 50 1000 20 0 10 0 0 0"); got != 1.65 {
		t.Errorf("machineBusy = %v, want 1.65 (user+nice+system+irq+softirq+steal)", got)
	}
}

func TestMarkdown(t *testing.T) {
	md := sampleResults(t).Markdown()
	for _, want := range []string{
		"| figure | raw | kernel-vxlan | tulle-udp |",
		"| TCP, 1 stream (Gbit/s) | 11.0 (10.0–12.0) | 10.0 (4.00–18.0) | 6.00 (4.00–9.00) |",
		"| inner MTU (bytes) | 1500 | 1450 | 1456 |",
		"| tulled peak RSS (largest node) (MiB) | – | – | 20.7 (20.5–20.8) |",
		"| tulle-udp | 0.60 (0.50–1.00) |",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("Markdown lacks %q:\n%s", want, md)
		}
	}
	// Every table row has as many cells as its header.
	for _, block := range strings.Split(md, "\n\n") {
		lines := strings.Split(strings.TrimSpace(block), "\n")
		if !strings.HasPrefix(lines[0], "|") {
			continue
		}
		want := strings.Count(lines[0], "|")
		for _, l := range lines[1:] {
			if strings.Count(l, "|") != want {
				t.Errorf("row %q has %d cells, header %d", l, strings.Count(l, "|"), want)
			}
		}
	}
}

func TestSVGWellFormed(t *testing.T) {
	svg := sampleResults(t).SVG()
	dec := xml.NewDecoder(bytes.NewReader(svg))
	rects, texts := 0, 0
	for {
		tok, err := dec.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("SVG is not well-formed XML: %v\n%s", err, svg)
		}
		if se, ok := tok.(xml.StartElement); ok {
			switch se.Name.Local {
			case "rect":
				rects++
			case "text":
				texts++
			}
		}
	}
	// Background + one bar per (figure, path) that has a value: TCP 3, RTT 3, RSS 1.
	if rects != 1+7 {
		t.Errorf("%d rects, want 8", rects)
	}
	if !bytes.Contains(svg, []byte("tulle-udp")) || !bytes.Contains(svg, []byte("min–max")) {
		t.Error("SVG lacks path names or title")
	}
}

func TestValidatePaths(t *testing.T) {
	if err := ValidatePaths(SupportedPaths()); err != nil {
		t.Error(err)
	}
	for _, bad := range [][]string{nil, {"raw", "tulle-geneve"}, {"bogus"}} {
		if err := ValidatePaths(bad); err == nil {
			t.Errorf("ValidatePaths(%v) succeeded", bad)
		}
	}
}

// TestSmoke runs the whole harness briefly (2 nodes, 2 s per run, one
// round, wire-like underlay) and checks the reports, not the speeds. Loss
// is exercised by TestLossyWire (cmd/tulled).
func TestSmoke(t *testing.T) {
	if testing.Short() {
		t.Skip("smoke run skipped in -short mode")
	}
	if err := Check(); err != nil {
		testenv.Skip(t, "bench smoke: %v", err)
	}
	bin := filepath.Join(t.TempDir(), "tulled")
	if out, err := exec.Command("go", "build", "-o", bin, "../cmd/tulled").CombinedOutput(); err != nil {
		t.Fatalf("build tulled: %v\n%s", err, out)
	}
	out := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	res, err := Run(ctx, Options{Env: EnvOptions{Nodes: 2, Tulled: bin, Wire: true, Progress: func(s string) { t.Log(s) }}, Rounds: 1, Duration: 2 * time.Second, Out: out})
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(out, "results.json"))
	if err != nil {
		t.Fatal(err)
	}
	var got Results
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatalf("results.json: %v", err)
	}
	if got.Schema != Schema || !got.Complete || !got.Config.Wire {
		t.Errorf("schema %q complete %v config %+v", got.Schema, got.Complete, got.Config)
	}
	var names []string
	for _, p := range got.Paths {
		names = append(names, p.Name)
		for _, fig := range []string{FigTCP1, FigTCPN, FigUDP64PPS, FigUDP1400PPS, FigRTTP50, FigLoadedP50} {
			if s, ok := p.Figures[fig]; !ok || s.Median <= 0 {
				t.Errorf("%s: figure %s missing or zero: %+v", p.Name, fig, s)
			}
		}
	}
	if strings.Join(names, ",") != strings.Join(SupportedPaths(), ",") {
		t.Errorf("paths %v, want %v", names, SupportedPaths())
	}
	for _, f := range []string{"results.md", "results.svg"} {
		if fi, err := os.Stat(filepath.Join(out, f)); err != nil || fi.Size() == 0 {
			t.Errorf("%s missing or empty", f)
		}
	}
	if res == nil || len(res.Paths) != len(names) {
		t.Error("Run returned no results")
	}
	if out, _ := exec.Command("ip", "netns", "list").Output(); strings.Contains(string(out), "tullebench-") {
		t.Errorf("namespaces left behind: %s", out)
	}
}

func mustAddr(s string) netip.Addr { return netip.MustParseAddr(s) }
