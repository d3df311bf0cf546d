package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/tulle-net/tulle/internal/tstest/topo"
)

// Options configure a benchmark run.
type Options struct {
	Env      EnvOptions
	Rounds   int           // default 3
	Duration time.Duration // per iperf3 run, default 10s
	Streams  int           // multi-stream TCP figure, default 4
	// AllToAll adds the all-to-all figure (every node sends to every
	// other at once); meant for 3 or more nodes.
	AllToAll bool
	// Out is the output directory for results.json, results.md and
	// results.svg; created if missing.
	Out string
}

func allToAllNodes(opt Options) int {
	if !opt.AllToAll {
		return 0
	}
	return opt.Env.Nodes
}

// Check returns why this machine cannot run the harness, as one line, or
// nil.
func Check() error {
	if why := topo.Require(); why != "" {
		return fmt.Errorf("bench %s", why)
	}
	for _, tool := range []string{"iperf3", "ss", "tc", "bridge"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("bench needs %s on PATH (apt-get install iperf3 iproute2)", tool)
		}
	}
	return nil
}

// Run builds the environment, measures, writes the reports into opt.Out
// and removes everything it built, also when interrupted or failing. When
// some rounds finished before an error, the reports are written with
// complete=false and the error is returned.
func Run(ctx context.Context, opt Options) (*Results, error) {
	if err := Check(); err != nil {
		return nil, err
	}
	if opt.Rounds <= 0 {
		opt.Rounds = 3
	}
	if opt.Duration <= 0 {
		opt.Duration = 10 * time.Second
	}
	if opt.Streams <= 0 {
		opt.Streams = 4
	}
	if opt.Env.MTU == 0 {
		opt.Env.MTU = 1500
	}
	if opt.Env.Nodes == 0 {
		opt.Env.Nodes = 2
	}
	if len(opt.Env.Paths) == 0 {
		opt.Env.Paths = SupportedPaths()
	}
	if err := ValidatePaths(opt.Env.Paths); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(opt.Out, 0o755); err != nil {
		return nil, fmt.Errorf("output dir: %w", err)
	}
	scratch, err := os.MkdirTemp("", "tulle-bench-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(scratch)
	opt.Env.Dir = scratch

	res := &Results{
		Schema: Schema, Started: time.Now().UTC(), Host: hostInfo(), Figures: figureInfos(opt.Streams, allToAllNodes(opt)),
		Config: Config{
			Nodes: opt.Env.Nodes, Paths: opt.Env.Paths, Rounds: opt.Rounds, DurationSeconds: opt.Duration.Seconds(),
			Streams: opt.Streams, MTU: opt.Env.MTU, NetemDelayMS: opt.Env.NetemDelayMS, NetemLossPct: opt.Env.NetemLossPct,
			Wire: opt.Env.Wire, LossPct: opt.Env.LossPct, TulledArgs: opt.Env.TulledArgs, AllToAll: opt.AllToAll,
			RTTSamples: RTTSamples,
		},
	}
	env, err := Setup(ctx, opt.Env)
	if err != nil {
		return nil, err
	}
	samples, merr := Measure(ctx, env, RunOptions{Rounds: opt.Rounds, Duration: opt.Duration, Streams: opt.Streams, AllToAll: opt.AllToAll, Progress: opt.Env.Progress})
	if cerr := env.Close(); cerr != nil {
		merr = errors.Join(merr, fmt.Errorf("cleanup: %w", cerr))
	}
	res.Seconds = time.Since(res.Started).Round(time.Second).Seconds()
	res.Complete = merr == nil
	if len(samples) == 0 {
		return nil, merr
	}
	if res.Paths, err = Summarize(samples, opt.Env.Paths); err != nil {
		return nil, errors.Join(merr, err)
	}
	for i := range res.Paths {
		for _, p := range env.Paths {
			if p.Name == res.Paths[i].Name {
				res.Paths[i].InnerMTU = p.MTU
			}
		}
	}
	if err := res.write(opt.Out); err != nil {
		return res, errors.Join(merr, err)
	}
	return res, merr
}

func (r *Results) write(dir string) error {
	if err := r.WriteJSON(filepath.Join(dir, "results.json")); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "results.md"), []byte(r.Markdown()), 0o644); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "results.svg"), r.SVG(), 0o644)
}
