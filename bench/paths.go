package bench

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"time"

	"github.com/tulle-net/tulle/internal/cluster"
	"github.com/tulle-net/tulle/internal/topo"
)

// Path names, as reports use them.
const (
	PathRaw         = "raw"
	PathKernelVXLAN = "kernel-vxlan"
	PathTulleUDP    = "tulle-udp"
)

// Path is one way from node 1 to node 2.
type Path struct {
	Name string
	Dst  netip.Addr // address on node 2 that iperf3 connects to
}

// Env is a two-node topology with every path configured side by side.
type Env struct {
	Topo    *topo.Topology
	Cluster *cluster.Cluster
	Paths   []Path
}

// EnvOptions configure Setup.
type EnvOptions struct {
	Tulled string // tulled binary
	Dir    string // scratch directory (leases, logs)
	MTU    int    // underlay MTU (default 1500)
	// TulledArgs are extra flags for tulled (e.g. --udp-gso=false).
	TulledArgs []string
}

// Setup builds the topology and configures raw, kernel VXLAN and tulle-udp.
func Setup(ctx context.Context, opt EnvOptions) (env *Env, err error) {
	tp, err := topo.New(topo.Options{Nodes: 2, MTU: opt.MTU, Prefix: "tullebench"})
	if err != nil {
		return nil, err
	}
	env = &Env{Topo: tp}
	defer func() {
		if err != nil {
			env.Close()
			env = nil
		}
	}()
	a, b := tp.Nodes[0], tp.Nodes[1]
	env.Paths = append(env.Paths, Path{Name: PathRaw, Dst: b.IP4})

	// Kernel VXLAN, configured as any operator would (flannel's VNI 1
	// style, unicast FDB entry to the peer), in 100.64.0.0/24.
	for i, n := range []*topo.Node{a, b} {
		peer := []*topo.Node{b, a}[i]
		for _, c := range [][]string{
			{"ip", "link", "add", "tvx0", "type", "vxlan", "id", "42", "dstport", "4789", "local", n.IP4.String(), "dev", n.Link},
			{"bridge", "fdb", "append", "00:00:00:00:00:00", "dev", "tvx0", "dst", peer.IP4.String()},
			{"ip", "addr", "add", fmt.Sprintf("100.64.0.%d/24", i+1), "dev", "tvx0"},
			{"ip", "link", "set", "tvx0", "up"},
		} {
			if _, err := n.Run(c[0], c[1:]...); err != nil {
				return env, fmt.Errorf("kernel vxlan: %w", err)
			}
		}
	}
	env.Paths = append(env.Paths, Path{Name: PathKernelVXLAN, Dst: netip.MustParseAddr("100.64.0.2")})

	c, err := cluster.New(tp, cluster.Options{Tulled: opt.Tulled, Dir: opt.Dir, Args: opt.TulledArgs})
	if err != nil {
		return env, err
	}
	env.Cluster = c
	if err := c.Start(ctx); err != nil {
		return env, err
	}
	dst, err := c.Nodes[1].Addr(ctx, false)
	if err != nil {
		return env, err
	}
	env.Paths = append(env.Paths, Path{Name: PathTulleUDP, Dst: dst})
	return env, nil
}

// Close removes everything Setup made.
func (e *Env) Close() error {
	if e.Cluster != nil {
		return e.Cluster.Close()
	}
	return e.Topo.Close()
}

// Sample is one measurement of one path.
type Sample struct {
	Path  string
	Round int
	Gbps  float64
	// Retransmits reported by the sender.
	Retransmits int
}

// Compare runs rounds of iperf3 TCP (streams streams, d each) over every
// path, interleaved (A B C A B C …), and returns all samples.
func Compare(ctx context.Context, env *Env, rounds int, d time.Duration, streams int, progress func(string)) ([]Sample, error) {
	a, b := env.Topo.Nodes[0], env.Topo.Nodes[1]
	const port = 5201
	srv, err := StartIperf3Server(b, port)
	if err != nil {
		return nil, err
	}
	defer srv.Stop()
	var out []Sample
	for r := range rounds {
		for _, p := range env.Paths {
			res, err := RunIperf3(ctx, a, p.Dst, port, d, streams)
			if err != nil {
				return out, fmt.Errorf("round %d, %s: %w", r+1, p.Name, err)
			}
			s := Sample{Path: p.Name, Round: r, Gbps: res.Gbps(), Retransmits: res.End.SumSent.Retransmits}
			out = append(out, s)
			if progress != nil {
				progress(fmt.Sprintf("round %d/%d  %-13s %6.2f Gbit/s  (%d retransmits)", r+1, rounds, p.Name, s.Gbps, s.Retransmits))
			}
		}
	}
	return out, nil
}

// Summary is the median and range of one path's samples, with its ratios to
// the references computed per round (so drift cancels) and then summarised.
type Summary struct {
	Path               string
	Median, Min, Max   float64
	VsVXLAN, VsRaw     float64 // median of per-round ratios
	VsVXLANMin, VsVXMx float64
}

// Summarize turns samples into one summary per path, in path order.
func Summarize(samples []Sample) ([]Summary, error) {
	byPath := map[string][]float64{}
	byRound := map[int]map[string]float64{}
	var order []string
	for _, s := range samples {
		if _, ok := byPath[s.Path]; !ok {
			order = append(order, s.Path)
		}
		byPath[s.Path] = append(byPath[s.Path], s.Gbps)
		if byRound[s.Round] == nil {
			byRound[s.Round] = map[string]float64{}
		}
		byRound[s.Round][s.Path] = s.Gbps
	}
	if len(order) == 0 {
		return nil, errors.New("no samples")
	}
	var out []Summary
	for _, p := range order {
		v := byPath[p]
		sm := Summary{Path: p, Median: median(v), Min: slices.Min(v), Max: slices.Max(v)}
		var rv, rr []float64
		for _, round := range byRound {
			if x, ok := round[p]; ok {
				if ref := round[PathKernelVXLAN]; ref > 0 {
					rv = append(rv, x/ref)
				}
				if ref := round[PathRaw]; ref > 0 {
					rr = append(rr, x/ref)
				}
			}
		}
		if len(rv) > 0 {
			sm.VsVXLAN, sm.VsVXLANMin, sm.VsVXMx = median(rv), slices.Min(rv), slices.Max(rv)
		}
		if len(rr) > 0 {
			sm.VsRaw = median(rr)
		}
		out = append(out, sm)
	}
	return out, nil
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	sort.Float64s(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// Table renders summaries as a Markdown table.
func Table(sums []Summary) string {
	t := "| path | Gbit/s median | min–max | × kernel VXLAN | × raw veth |\n|---|---|---|---|---|\n"
	for _, s := range sums {
		t += fmt.Sprintf("| %s | %.2f | %.2f–%.2f | %.2f | %.2f |\n", s.Path, s.Median, s.Min, s.Max, s.VsVXLAN, s.VsRaw)
	}
	return t
}
