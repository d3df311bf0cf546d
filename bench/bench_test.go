package bench

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/tulle-net/tulle/internal/topo"
)

func TestParseIperf3(t *testing.T) {
	b, err := os.ReadFile("testdata/iperf3-tcp-1stream.json")
	if err != nil {
		t.Fatal(err)
	}
	r, err := ParseIperf3(b)
	if err != nil {
		t.Fatal(err)
	}
	if g := r.Gbps(); g < 14.6 || g > 14.7 {
		t.Errorf("Gbps = %.3f, want 14.65 (the captured run)", g)
	}
	if r.Start.TestStart.Protocol != "TCP" || r.Start.TestStart.NumStreams != 1 {
		t.Errorf("start = %+v", r.Start.TestStart)
	}
	for _, bad := range []string{`{"error":"unable to connect to server: Connection refused"}`, `{}`, `not json`} {
		if _, err := ParseIperf3([]byte(bad)); err == nil {
			t.Errorf("ParseIperf3(%s) succeeded", bad)
		}
	}
}

func TestSummarize(t *testing.T) {
	samples := []Sample{
		{PathRaw, 0, 10, 0}, {PathKernelVXLAN, 0, 8, 0}, {PathTulleUDP, 0, 4, 0},
		{PathRaw, 1, 12, 0}, {PathKernelVXLAN, 1, 10, 0}, {PathTulleUDP, 1, 6, 0},
		{PathRaw, 2, 11, 0}, {PathKernelVXLAN, 2, 9, 0}, {PathTulleUDP, 2, 9, 0},
	}
	sums, err := Summarize(samples)
	if err != nil {
		t.Fatal(err)
	}
	u := sums[2]
	if u.Path != PathTulleUDP || u.Median != 6 || u.Min != 4 || u.Max != 9 {
		t.Errorf("tulle-udp summary = %+v", u)
	}
	// Per-round ratios 0.5, 0.6, 1.0: median 0.6 (not 6/9).
	if u.VsVXLAN != 0.6 || u.VsVXLANMin != 0.5 || u.VsVXMx != 1.0 {
		t.Errorf("ratios vs VXLAN = %.3f [%.3f, %.3f], want 0.6 [0.5, 1.0]", u.VsVXLAN, u.VsVXLANMin, u.VsVXMx)
	}
	if _, err := Summarize(nil); err == nil {
		t.Error("Summarize(nil) succeeded")
	}
}

// BenchmarkOverlays measures iperf3 TCP (one stream) node to node over the
// raw veth, kernel VXLAN and tulle-udp, interleaved, BENCH_ROUNDS rounds of
// BENCH_SECONDS each (default 3 × 10 s). Run with: make bench.
func BenchmarkOverlays(b *testing.B) {
	if why := topo.Require(); why != "" {
		b.Skip(why)
	}
	if _, err := exec.LookPath("iperf3"); err != nil {
		b.Skip("needs iperf3")
	}
	tulled := os.Getenv("TULLED")
	if tulled == "" {
		b.Skip("set TULLED to a tulled binary (make bench does)")
	}
	rounds, secs := envInt("BENCH_ROUNDS", 3), envInt("BENCH_SECONDS", 10)
	for b.Loop() {
		ctx := context.Background()
		env, err := Setup(ctx, EnvOptions{Tulled: tulled, Dir: b.TempDir()})
		if err != nil {
			b.Fatal(err)
		}
		samples, err := Compare(ctx, env, rounds, time.Duration(secs)*time.Second, 1, func(s string) { b.Log(s) })
		if cerr := env.Close(); cerr != nil {
			b.Error(cerr)
		}
		if err != nil {
			b.Fatal(err)
		}
		sums, err := Summarize(samples)
		if err != nil {
			b.Fatal(err)
		}
		b.Log("\n" + Table(sums))
		for _, s := range sums {
			b.ReportMetric(s.Median, "Gbit/s-"+s.Path)
		}
		os.WriteFile(filepath.Join(os.TempDir(), "tulle-bench-table.md"), []byte(Table(sums)), 0o644)
	}
}

func envInt(name string, def int) int {
	v, err := strconv.Atoi(os.Getenv(name))
	if err != nil || v <= 0 {
		return def
	}
	return v
}
