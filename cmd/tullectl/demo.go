package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/tulle-net/tulle/internal/netconf"
	"github.com/tulle-net/tulle/internal/tstest/cluster"
	"github.com/tulle-net/tulle/internal/tstest/topo"
	"github.com/tulle-net/tulle/lease/local"
)

// demo builds a namespace cluster, runs tulled on every node with the local
// lease store, checks connectivity and a TCP transfer, and tears it all down
// (also on Ctrl-C). It fails when any check fails.
func demo(ctx context.Context, args []string) (err error) {
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	bin := fs.String("tulled", "", "tulled binary (default: next to tullectl, else on PATH)")
	nodes := fs.Int("nodes", 3, "number of nodes (2-20)")
	sizeMB := fs.Int("transfer-mb", 200, "size of the TCP transfer in MB")
	kube := fs.Bool("kube", false, "a real Kubernetes cluster instead (kubelet + containerd nodes, tulle installed with kubectl apply -k deploy/; --nodes defaults to 3, at most 4)")
	root := fs.String("root", ".", "with --kube: the tulle repository (for make image and the test image)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *kube {
		return demoKube(ctx, *root, *nodes)
	}
	if *nodes < 2 || *nodes > 20 {
		return fmt.Errorf("--nodes %d: want 2 to 20", *nodes)
	}
	if why := topo.Require(); why != "" {
		return fmt.Errorf("demo %s", why)
	}
	if _, err := exec.LookPath("ping"); err != nil {
		return errors.New("demo needs ping (apt-get install iputils-ping)")
	}
	tulled, err := findTulled(*bin)
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "tulle-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)

	step("building %d nodes in network namespaces (underlay 198.18.0.0/24, fd00:198::/64)", *nodes)
	c, err := cluster.Build(topo.Options{Nodes: *nodes, Prefix: "tulledemo"}, cluster.Options{Tulled: tulled, Dir: dir})
	if err != nil {
		return err
	}
	tp := c.Topo
	defer func() {
		step("cleaning up: stopping tulled, tulled cleanup on each node, removing namespaces")
		if cerr := c.Close(); cerr != nil {
			err = errors.Join(err, cerr)
		}
		if ctx.Err() != nil {
			err = errors.New("interrupted; everything it made is removed")
		}
	}()
	for _, n := range tp.Nodes {
		fmt.Printf("    %s  netns %s  underlay %s / %s\n", n.Name, n.NS, n.IP4, n.IP6)
	}

	step("starting tulled on every node (local lease store, network %s)", "100.96.0.0/12 + fd00:96::/56")
	if err := c.Start(ctx); err != nil {
		return err
	}
	conf, _ := netconf.Parse([]byte(cluster.DefaultNetConf))
	store, err := local.New(local.Options{Dir: filepath.Join(dir, "leases"), Net: conf})
	if err != nil {
		return err
	}
	all, err := store.List()
	if err != nil {
		return err
	}
	step("leases")
	if err := printLeases(all, time.Now()); err != nil {
		return err
	}

	step("ping every node's subnet from every other node (IPv4 and IPv6)")
	failed := 0
	pings := 0
	for _, from := range c.Nodes {
		for _, to := range c.Nodes {
			if from == to {
				continue
			}
			for _, v6 := range []bool{false, true} {
				dst, err := to.Addr(ctx, v6)
				if err != nil {
					return err
				}
				pings++
				out, err := from.Command(ctx, "ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", dst.String()).CombinedOutput()
				if ctx.Err() != nil {
					return ctx.Err()
				}
				mark := "ok  "
				if err != nil {
					mark = "FAIL"
					failed++
				}
				fmt.Printf("    %s %s → %-22s %s\n", mark, from.Name, dst, pingSummary(string(out)))
			}
		}
	}

	a, b := c.Nodes[0], c.Nodes[1]
	dst, err := b.Addr(ctx, false)
	if err != nil {
		return err
	}
	size := int64(*sizeMB) << 20
	step("TCP transfer of %d MB from %s to %s (%s) through the userspace UDP path", *sizeMB, a.Name, b.Name, dst)
	tr, terr := cluster.Transfer(ctx, a, b, dst, size, 0)
	switch {
	case terr != nil:
		fmt.Printf("    FAIL %v\n", terr)
		failed++
	case !tr.Intact():
		fmt.Printf("    FAIL checksum mismatch: sent %x, received %x\n", tr.Sent[:8], tr.Received[:8])
		failed++
	default:
		fmt.Printf("    ok   %d MB in %v (%.2f Gbit/s), SHA-256 %x… matches at both ends\n", *sizeMB, tr.Duration.Round(time.Millisecond), tr.Gbps(), tr.Sent[:8])
	}

	step("counters")
	for _, n := range c.Nodes {
		s, err := n.Status(ctx)
		if err != nil {
			return err
		}
		k := s.Counters
		drops := uint64(0)
		for name, v := range k {
			if strings.HasPrefix(name, "drop_") {
				drops += v
			}
		}
		fmt.Printf("    %s  tx %d frames / %d datagrams, rx %d frames / %d datagrams, drops %d, peers %d\n",
			n.Name, k["tx_frames"], k["datagrams_out"], k["rx_frames"], k["datagrams_in"], drops, len(s.Peers))
	}

	step("summary: %d/%d pings ok, transfer %s", pings-min(failed, pings), pings, map[bool]string{true: "ok", false: "FAILED"}[terr == nil && tr.Intact()])
	if failed > 0 {
		return fmt.Errorf("%d checks failed", failed)
	}
	return nil
}

func step(format string, a ...any) {
	fmt.Printf("==> "+format+"\n", a...)
}

// pingSummary extracts ping's rtt line.
func pingSummary(out string) string {
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, "rtt ") || strings.Contains(l, "packet loss") && !strings.Contains(l, " 0% packet loss") {
			return strings.TrimSpace(l)
		}
	}
	return ""
}

func findTulled(flagVal string) (string, error) {
	if flagVal != "" {
		if _, err := os.Stat(flagVal); err != nil {
			return "", fmt.Errorf("--tulled: %w", err)
		}
		return filepath.Abs(flagVal)
	}
	if self, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(self), "tulled")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	if p, err := exec.LookPath("tulled"); err == nil {
		return filepath.Abs(p)
	}
	return "", errors.New("tulled binary not found: pass --tulled or put it next to tullectl")
}
