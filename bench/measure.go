package bench

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/tulle-net/tulle/internal/tstest/cluster"
	"github.com/tulle-net/tulle/internal/tstest/topo"
)

// Figure keys, the stable names in results.json.
const (
	FigTCP1       = "tcp_1_stream_gbps"
	FigTCPN       = "tcp_multi_stream_gbps"
	FigAllToAll   = "tcp_all_to_all_gbps"
	FigUDP64PPS   = "udp_64_pps"
	FigUDP64Loss  = "udp_64_loss_pct"
	FigUDP1400PPS = "udp_1400_pps"
	FigUDP1400Los = "udp_1400_loss_pct"
	FigRTTP50     = "rtt_p50_us"
	FigRTTP99     = "rtt_p99_us"
	FigLoadedP50  = "rtt_loaded_p50_us"
	FigLoadedP99  = "rtt_loaded_p99_us"
	FigCPUTulled  = "cpu_tulled_s_per_gb"
	FigCPUMachine = "cpu_machine_s_per_gb"
	FigRSS        = "tulled_peak_rss_mib"
)

// FigureInfo describes a figure for readers of the results.
type FigureInfo struct {
	Key            string `json:"key"`
	Title          string `json:"title"`
	Unit           string `json:"unit"`
	HigherIsBetter bool   `json:"higherIsBetter"`
}

// figureInfos lists every figure in report order; streams names the
// multi-stream count, nodes the all-to-all size (0: not measured).
func figureInfos(streams, nodes int) []FigureInfo {
	fs := []FigureInfo{
		{FigTCP1, "TCP, 1 stream", "Gbit/s", true},
		{FigTCPN, fmt.Sprintf("TCP, %d streams", streams), "Gbit/s", true},
	}
	if nodes > 0 {
		fs = append(fs, FigureInfo{FigAllToAll, fmt.Sprintf("TCP all-to-all, %d nodes (sum of %d streams)", nodes, nodes*(nodes-1)), "Gbit/s", true})
	}
	return append(fs, []FigureInfo{
		{FigUDP64PPS, "UDP 64 B received", "packets/s", true},
		{FigUDP64Loss, "UDP 64 B loss", "%", false},
		{FigUDP1400PPS, "UDP 1400 B received", "packets/s", true},
		{FigUDP1400Los, "UDP 1400 B loss", "%", false},
		{FigRTTP50, "RTT p50 (TCP request/response)", "µs", false},
		{FigRTTP99, "RTT p99 (TCP request/response)", "µs", false},
		{FigLoadedP50, "RTT p50 under load (beside a bulk TCP stream)", "µs", false},
		{FigLoadedP99, "RTT p99 under load (beside a bulk TCP stream)", "µs", false},
		{FigCPUTulled, "tulled CPU per GB (TCP 1 stream)", "CPU s/GB", false},
		{FigCPUMachine, "machine CPU per GB (TCP 1 stream)", "CPU s/GB", false},
		{FigRSS, "tulled peak RSS (largest node)", "MiB", false},
	}...)
}

// RTTSamples is how many request/response round trips make one RTT figure.
const RTTSamples = 1000

// Sample is one measurement of one figure on one path in one round.
type Sample struct {
	Path   string
	Figure string
	Round  int
	Value  float64
}

// RunOptions configure Measure.
type RunOptions struct {
	Rounds   int           // ≥ 1; reports want ≥ 3
	Duration time.Duration // per iperf3 run
	Streams  int           // for the multi-stream figure
	// AllToAll adds the all-to-all figure: every node sends one TCP
	// stream to every other at once.
	AllToAll bool
	Progress func(string)
}

const iperfPort = 5201

// Measure runs every figure on every path of env, Rounds times, paths
// interleaved within each figure, and returns the samples.
func Measure(ctx context.Context, env *Env, opt RunOptions) ([]Sample, error) {
	progress := opt.Progress
	if progress == nil {
		progress = func(string) {}
	}
	a, b := env.Topo.Nodes[0], env.Topo.Nodes[1]
	srv, err := startIperf3Server(ctx, b, iperfPort)
	if err != nil {
		return nil, err
	}
	defer srv.stop()
	var out []Sample
	add := func(p Path, fig string, round int, v float64) {
		out = append(out, Sample{Path: p.Name, Figure: fig, Round: round, Value: v})
	}
	type step struct {
		name string
		run  func(p Path, round int) (string, error)
	}
	tcp := func(fig string, streams int) func(Path, int) (string, error) {
		return func(p Path, round int) (string, error) {
			before := readCPU(env.TulledPIDs(p))
			r, err := runIperf3(ctx, a, iperf3Run{Dst: p.Dst, Port: iperfPort, Duration: opt.Duration, Streams: streams})
			if err != nil {
				return "", err
			}
			add(p, fig, round, r.Gbps())
			if streams == 1 {
				after := readCPU(env.TulledPIDs(p))
				gb := r.End.SumReceived.Bytes / 1e9
				add(p, FigCPUMachine, round, (after.machine-before.machine)/gb)
				if p.Tulle {
					add(p, FigCPUTulled, round, (after.tulled-before.tulled)/gb)
				}
			}
			return fmt.Sprintf("%.2f Gbit/s, %d retransmits", r.Gbps(), r.End.SumSent.Retransmits), nil
		}
	}
	udp := func(size int, pps, loss string) func(Path, int) (string, error) {
		return func(p Path, round int) (string, error) {
			run := iperf3Run{Dst: p.Dst, Port: iperfPort, Duration: opt.Duration, UDPSize: size}
			r, err := runIperf3(ctx, a, run)
			if err != nil && ctx.Err() == nil {
				// Under loss iperf3's own control connection sometimes
				// fails at the end of an unlimited flood ("unable to read
				// from stream socket"), on every path, raw included: one
				// more try.
				progress(fmt.Sprintf("%s: %v; once more", p.Name, err))
				r, err = runIperf3(ctx, a, run)
			}
			if err != nil {
				return "", err
			}
			add(p, pps, round, r.ReceivedPPS())
			add(p, loss, round, r.LossPercent())
			return fmt.Sprintf("%.0f packets/s received, %.2f%% lost", r.ReceivedPPS(), r.LossPercent()), nil
		}
	}
	rtt := func(p Path, round int) (string, error) {
		p50, p99, err := measureRTT(ctx, env, p, RTTSamples, 0)
		if err != nil {
			return "", err
		}
		add(p, FigRTTP50, round, p50)
		add(p, FigRTTP99, round, p99)
		if p.Tulle {
			add(p, FigRSS, round, peakRSSMiB(env.TulledPIDs(p)))
		}
		return fmt.Sprintf("p50 %.0f µs, p99 %.0f µs", p50, p99), nil
	}
	// Small request/responses beside one bulk TCP stream on the same path:
	// what queues in the path (TUN queue, socket buffers, trains ahead of
	// a small packet) costs every other flow.
	loaded := func(p Path, round int) (string, error) {
		errc := make(chan error, 1)
		go func() {
			_, err := runIperf3(ctx, a, iperf3Run{Dst: p.Dst, Port: iperfPort, Duration: opt.Duration, Streams: 1})
			errc <- err
		}()
		// After slow start; stop a second before the stream does.
		select {
		case <-time.After(time.Second):
		case err := <-errc:
			return "", fmt.Errorf("bulk stream: %w", err)
		}
		p50, p99, err := measureRTT(ctx, env, p, RTTSamples, max(opt.Duration-2*time.Second, time.Second))
		if berr := <-errc; err == nil && berr != nil {
			err = fmt.Errorf("bulk stream: %w", berr)
		}
		if err != nil {
			return "", err
		}
		add(p, FigLoadedP50, round, p50)
		add(p, FigLoadedP99, round, p99)
		return fmt.Sprintf("p50 %.0f µs, p99 %.0f µs", p50, p99), nil
	}
	steps := []step{
		{"TCP 1 stream", tcp(FigTCP1, 1)},
		{fmt.Sprintf("TCP %d streams", opt.Streams), tcp(FigTCPN, opt.Streams)},
	}
	if opt.AllToAll {
		n := len(env.Topo.Nodes)
		steps = append(steps, step{fmt.Sprintf("TCP all-to-all (%d)", n*(n-1)), func(p Path, round int) (string, error) {
			gbps, err := allToAll(ctx, env, p, opt.Duration)
			if err != nil {
				return "", err
			}
			add(p, FigAllToAll, round, gbps)
			return fmt.Sprintf("%.2f Gbit/s in all", gbps), nil
		}})
	}
	steps = append(steps, []step{
		{"UDP 64 B", udp(64, FigUDP64PPS, FigUDP64Loss)},
		{"UDP 1400 B", udp(1400, FigUDP1400PPS, FigUDP1400Los)},
		{fmt.Sprintf("RTT (%d round trips)", RTTSamples), rtt},
		{"RTT under load", loaded},
	}...)
	for round := range opt.Rounds {
		for _, s := range steps {
			for _, p := range env.Paths {
				if err := ctx.Err(); err != nil {
					return out, err
				}
				msg, err := s.run(p, round)
				if err != nil {
					return out, fmt.Errorf("round %d, %s, %s: %w", round+1, s.name, p.Name, err)
				}
				progress(fmt.Sprintf("round %d/%d  %-22s %-14s %s", round+1, opt.Rounds, s.name, p.Name, msg))
			}
		}
	}
	return out, nil
}

// cpuTimes are CPU seconds consumed so far.
type cpuTimes struct {
	tulled  float64 // by the given processes
	machine float64 // by the whole machine (not idle, not iowait)
}

func readCPU(pids []int) cpuTimes {
	var t cpuTimes
	for _, pid := range pids {
		t.tulled += cluster.ProcCPUSeconds(pid)
	}
	if f, err := os.Open("/proc/stat"); err == nil {
		defer f.Close()
		sc := bufio.NewScanner(f)
		if sc.Scan() {
			t.machine = machineBusy(sc.Text())
		}
	}
	return t
}

// machineBusy parses the "cpu" line of /proc/stat into busy CPU seconds.
func machineBusy(line string) float64 {
	f := strings.Fields(line)
	if len(f) < 9 || f[0] != "cpu" {
		return 0
	}
	var busy float64
	for i, s := range f[1:9] { // user nice system idle iowait irq softirq steal
		v, _ := strconv.ParseFloat(s, 64)
		if i != 3 && i != 4 {
			busy += v
		}
	}
	return busy / cluster.ClockTicks
}

// peakRSSMiB is the largest VmHWM among pids.
func peakRSSMiB(pids []int) float64 {
	var peak float64
	for _, pid := range pids {
		peak = max(peak, cluster.ProcStatusKB(pid, "VmHWM:")/1024)
	}
	return peak
}

// measureRTT times n one-byte request/response exchanges over one TCP
// connection (Nagle off) from node 1 to p.Dst and returns p50 and p99 in µs.
// With within > 0 it stops early when that time is up (at least 20
// exchanges count).
func measureRTT(ctx context.Context, env *Env, p Path, n int, within time.Duration) (p50, p99 float64, err error) {
	return echoRTT(ctx, env.Topo.Nodes[0], env.Topo.Nodes[1], p.Dst, n, within)
}

// echoRTT is measureRTT between two nodes: from a to dst, an address of b.
func echoRTT(ctx context.Context, a, b *topo.Node, dst netip.Addr, n int, within time.Duration) (p50, p99 float64, err error) {
	ln, err := b.Listen(net.JoinHostPort(dst.String(), "0"))
	if err != nil {
		return 0, 0, err
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		io.Copy(c, c) // echo
	}()
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	c, err := a.Dial(ctx, ln.Addr().String())
	if err != nil {
		return 0, 0, err
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	c.(*net.TCPConn).SetNoDelay(true)
	var buf [1]byte
	// A few unmeasured exchanges warm the path (ARP, caches).
	rtts := make([]float64, 0, n)
	var until time.Time
	if within > 0 {
		until = time.Now().Add(within)
	}
	for i := range n + 10 {
		if !until.IsZero() && len(rtts) >= 20 && time.Now().After(until) {
			break
		}
		start := time.Now()
		if _, err := c.Write(buf[:]); err != nil {
			return 0, 0, err
		}
		if _, err := io.ReadFull(c, buf[:]); err != nil {
			return 0, 0, err
		}
		if i >= 10 {
			rtts = append(rtts, float64(time.Since(start).Nanoseconds())/1e3)
		}
	}
	slices.Sort(rtts)
	return percentile(rtts, 50), percentile(rtts, 99), nil
}

// percentile of sorted values (nearest rank).
func percentile(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(float64(len(sorted))*p/100+0.999999) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

// allToAll runs one TCP stream from every node to every other node at
// once, on path p, and returns the sum received. iperf3 serves one client
// at a time, so each receiver runs a server per sender.
func allToAll(ctx context.Context, env *Env, p Path, d time.Duration) (float64, error) {
	nodes := env.Topo.Nodes
	port := func(from int) int { return iperfPort + 100 + from }
	var servers []*iperf3Server
	defer func() {
		for _, s := range servers {
			s.stop()
		}
	}()
	for j, n := range nodes {
		for i := range nodes {
			if i == j {
				continue
			}
			s, err := startIperf3Server(ctx, n, port(i))
			if err != nil {
				return 0, err
			}
			servers = append(servers, s)
		}
	}
	type result struct {
		gbps float64
		err  error
	}
	results := make(chan result, len(nodes)*len(nodes))
	runs := 0
	for i, from := range nodes {
		for j := range nodes {
			if i == j {
				continue
			}
			runs++
			go func() {
				r, err := runIperf3(ctx, from, iperf3Run{Dst: p.Addrs[j], Port: port(i), Duration: d, Streams: 1})
				if err != nil {
					results <- result{err: fmt.Errorf("node %d → %d: %w", i+1, j+1, err)}
					return
				}
				results <- result{gbps: r.Gbps()}
			}()
		}
	}
	var sum float64
	var errs []error
	for range runs {
		r := <-results
		sum += r.gbps
		errs = append(errs, r.err)
	}
	return sum, errors.Join(errs...)
}
