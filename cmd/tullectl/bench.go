package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/tulle-net/tulle/bench"
)

// benchCmd runs the benchmark harness: every path side by side on one
// namespace cluster, reports in --out.
func benchCmd(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	out := fs.String("out", "bench-out", "output directory for results.json, results.md, results.svg")
	nodes := fs.Int("nodes", 2, "nodes in the cluster (2-8); traffic runs from node 1 to node 2")
	paths := fs.String("paths", strings.Join(bench.SupportedPaths(), ","), "comma-separated paths to measure")
	duration := fs.Duration("duration", 10*time.Second, "length of each iperf3 run (whole seconds)")
	rounds := fs.Int("rounds", 3, "rounds; each figure is the median of one sample per round")
	streams := fs.Int("streams", 4, "TCP streams for the multi-stream figure")
	mtu := fs.Int("mtu", 1500, "underlay MTU")
	delay := fs.Duration("netem-delay", 0, "netem delay on every underlay link (e.g. 2ms)")
	loss := fs.Float64("netem-loss", 0, "netem loss on every underlay link, in percent")
	wire := fs.Bool("wire", false, "wire-like underlay: segmentation offloads off on every underlay link, so single packets cross as on a NIC's wire")
	lossPct := fs.Float64("loss", 0, "random packet loss on every underlay link, in percent (nftables; works without sch_netem)")
	tulled := fs.String("tulled", "", "tulled binary (default: next to tullectl, else on PATH)")
	allToAll := fs.Bool("all-to-all", false, "add a figure: every node sends one TCP stream to every other at once (use with --nodes 4)")
	tulledArgs := fs.String("tulled-args", "", "extra tulled flags for the tulle paths, space-separated (e.g. \"--tun-queues 1\")")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("bench: unexpected argument %q", fs.Arg(0))
	}
	switch {
	case *nodes < 2 || *nodes > 8:
		return fmt.Errorf("bench --nodes %d: want 2 to 8", *nodes)
	case *duration < time.Second:
		return fmt.Errorf("bench --duration %s: want at least 1s", *duration)
	case *rounds < 1:
		return fmt.Errorf("bench --rounds %d: want at least 1", *rounds)
	case *streams < 1 || *streams > 128:
		return fmt.Errorf("bench --streams %d: want 1 to 128", *streams)
	case *mtu < 1280 || *mtu > 9000:
		return fmt.Errorf("bench --mtu %d: want 1280 to 9000", *mtu)
	case *loss < 0 || *loss > 100:
		return fmt.Errorf("bench --netem-loss %g: want 0 to 100", *loss)
	case *lossPct < 0 || *lossPct > 100:
		return fmt.Errorf("bench --loss %g: want 0 to 100", *lossPct)
	case *delay < 0:
		return fmt.Errorf("bench --netem-delay %s: negative", *delay)
	}
	sel := strings.Split(*paths, ",")
	if err := bench.ValidatePaths(sel); err != nil {
		return fmt.Errorf("bench --paths: %w", err)
	}
	if err := bench.Check(); err != nil {
		return err
	}
	bin, err := findTulled(*tulled)
	if err != nil {
		return err
	}
	start := time.Now()
	progress := func(s string) {
		fmt.Fprintf(os.Stderr, "[%5.0fs] %s\n", time.Since(start).Seconds(), s)
	}
	res, err := bench.Run(ctx, bench.Options{
		Env: bench.EnvOptions{
			Nodes: *nodes, Paths: sel, Tulled: bin, MTU: *mtu,
			NetemDelayMS: float64(*delay) / float64(time.Millisecond), NetemLossPct: *loss,
			Wire: *wire, LossPct: *lossPct, TulledArgs: strings.Fields(*tulledArgs),
			Progress: progress,
		},
		Rounds: *rounds, Duration: *duration, Streams: *streams, AllToAll: *allToAll, Out: *out,
	})
	if res != nil {
		fmt.Print(res.Markdown())
		abs, _ := filepath.Abs(*out)
		progress("wrote " + filepath.Join(abs, "results.{json,md,svg}"))
	}
	if err != nil && ctx.Err() != nil {
		return fmt.Errorf("bench interrupted; everything it made is removed")
	}
	return err
}
