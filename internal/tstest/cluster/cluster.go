// Package cluster runs tulled on the nodes of a topo.Topology: one process
// per node namespace with its own run directory and log, all sharing one
// local lease directory. The e2e tests, the demo and the benchmark harness
// drive tulled through it exactly as an operator would: flags, signals,
// the status socket and `tulled cleanup`.
package cluster

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/tulle-net/tulle/internal/api"
	"github.com/tulle-net/tulle/internal/tstest/topo"
)

// DefaultNetConf is a dual-stack cluster in the test ranges.
const DefaultNetConf = `{"Network":"100.96.0.0/12","SubnetLen":24,"EnableIPv6":true,"IPv6Network":"fd00:96::/56","IPv6SubnetLen":64,"Backend":{"Type":"udp","Port":8285}}`

// Options configure a Cluster.
type Options struct {
	// Tulled is the tulled binary.
	Tulled string
	// Dir holds the lease directory, run directories and logs.
	Dir string
	// NetConf is the net-conf.json document (DefaultNetConf if empty).
	NetConf string
	// IPv6Underlay makes tulled use the nodes' IPv6 underlay addresses.
	IPv6Underlay bool
	// DualStackUnderlay publishes both underlay addresses (IPv4 carries
	// udp; host-gw routes each family via its own).
	DualStackUnderlay bool
	// LeaseTTL is passed as --lease-ttl (default 30s).
	LeaseTTL time.Duration
	// Args are extra tulled flags for every node.
	Args []string
	// NodeArgs are extra tulled flags for the node of that index (a mixed
	// cluster); they become Node.Extra.
	NodeArgs map[int][]string
}

// Cluster is a set of tulled processes.
type Cluster struct {
	Topo  *topo.Topology
	Nodes []*Node
	opt   Options
}

// Node is one tulled on one topology node.
type Node struct {
	*topo.Node
	c       *Cluster
	RunDir  string
	LogPath string
	// Extra are flags for this node alone, read at each Start (a restart
	// with another capability).
	Extra   []string
	cmd     *exec.Cmd
	exited  chan struct{}
	exitErr error
}

// New prepares tulled for every node of t; Start launches them.
func New(t *topo.Topology, opt Options) (*Cluster, error) {
	if opt.NetConf == "" {
		opt.NetConf = DefaultNetConf
	}
	if opt.LeaseTTL == 0 {
		opt.LeaseTTL = 30 * time.Second
	}
	if err := os.MkdirAll(filepath.Join(opt.Dir, "leases"), 0o755); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(opt.Dir, "net-conf.json"), []byte(opt.NetConf), 0o644); err != nil {
		return nil, err
	}
	c := &Cluster{Topo: t, opt: opt}
	for i, tn := range t.Nodes {
		c.Nodes = append(c.Nodes, &Node{
			Node:    tn,
			c:       c,
			RunDir:  filepath.Join(opt.Dir, tn.Name, "run"),
			LogPath: filepath.Join(opt.Dir, tn.Name+".log"),
			Extra:   opt.NodeArgs[i],
		})
	}
	return c, nil
}

// Build makes a topology and prepares tulled on every node of it. On
// error nothing is left behind; on success Close removes both.
func Build(to topo.Options, opt Options) (*Cluster, error) {
	tp, err := topo.New(to)
	if err != nil {
		return nil, err
	}
	c, err := New(tp, opt)
	if err != nil {
		tp.Close()
		return nil, err
	}
	return c, nil
}

// Args returns the tulled flags for node n (without the command).
func (n *Node) Args() []string {
	o := n.c.opt
	a := []string{
		"--net-conf", filepath.Join(o.Dir, "net-conf.json"),
		"--node-name", n.Name,
		"--lease-dir", filepath.Join(o.Dir, "leases"),
		"--lease-ttl", o.LeaseTTL.String(),
		"--run-dir", n.RunDir,
		"--iface", n.Link,
		"--wireguard-key", n.WireGuardKey(),
		// Off: paths of the bench share a namespace; a test that scrapes
		// turns it on with Args.
		"--http-addr=",
	}
	switch {
	case o.DualStackUnderlay:
		a = append(a, "--public-ip", n.IP4.String(), "--public-ipv6", n.IP6.String())
	case o.IPv6Underlay:
		a = append(a, "--public-ipv6", n.IP6.String())
	default:
		a = append(a, "--public-ip", n.IP4.String())
	}
	a = append(a, o.Args...)
	return append(a, n.Extra...)
}

// LeaseDir is the local lease store the nodes share.
func (c *Cluster) LeaseDir() string { return filepath.Join(c.opt.Dir, "leases") }

// WireGuardKey is the node's WireGuard key file (made by tulled on its
// first start with Backend.Type wireguard, kept across restarts).
func (n *Node) WireGuardKey() string { return filepath.Join(n.c.opt.Dir, n.Name, "wireguard.key") }

// Start launches tulled on every node and waits until each has a lease
// and sees all the others as peers.
func (c *Cluster) Start(ctx context.Context) error {
	for _, n := range c.Nodes {
		if err := n.Start(); err != nil {
			return err
		}
	}
	return c.WaitPeers(ctx, len(c.Nodes)-1)
}

// WaitPeers waits until every running node has want peers.
func (c *Cluster) WaitPeers(ctx context.Context, want int) error {
	for _, n := range c.Nodes {
		if !n.Running() {
			continue
		}
		if err := n.WaitPeers(ctx, want); err != nil {
			return err
		}
	}
	return nil
}

// Start launches this node's tulled (its log is appended to LogPath).
func (n *Node) Start() error {
	if n.Running() {
		return fmt.Errorf("%s: tulled already running", n.Name)
	}
	if err := os.MkdirAll(n.RunDir, 0o755); err != nil {
		return err
	}
	log, err := os.OpenFile(n.LogPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	cmd := exec.Command("ip", append([]string{"netns", "exec", n.NS, n.c.opt.Tulled}, n.Args()...)...)
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		log.Close()
		return fmt.Errorf("%s: start tulled: %w", n.Name, err)
	}
	n.cmd, n.exited = cmd, make(chan struct{})
	go func() {
		n.exitErr = cmd.Wait()
		log.Close()
		close(n.exited)
	}()
	return nil
}

// PID returns the running tulled's process id, or 0.
func (n *Node) PID() int {
	if !n.Running() {
		return 0
	}
	return n.cmd.Process.Pid
}

// Running reports whether this node's tulled process is alive.
func (n *Node) Running() bool {
	if n.cmd == nil {
		return false
	}
	select {
	case <-n.exited:
		return false
	default:
		return true
	}
}

// Stop sends sig and waits for tulled to exit (SIGKILL after 10 s).
func (n *Node) Stop(sig syscall.Signal) error {
	if !n.Running() {
		return nil
	}
	n.cmd.Process.Signal(sig)
	select {
	case <-n.exited:
	case <-time.After(10 * time.Second):
		n.cmd.Process.Kill()
		<-n.exited
		return fmt.Errorf("%s: tulled ignored %v for 10s", n.Name, sig)
	}
	var ee *exec.ExitError
	if sig == syscall.SIGKILL || n.exitErr == nil || errors.As(n.exitErr, &ee) && ee.ExitCode() == 0 {
		return nil
	}
	return fmt.Errorf("%s: tulled exited with %v after %v; log:\n%s", n.Name, n.exitErr, sig, n.Log())
}

// Cleanup runs `tulled cleanup` for the node (tulled must be stopped).
func (n *Node) Cleanup() error {
	out, err := n.Command(context.Background(), n.c.opt.Tulled, append([]string{"cleanup"}, n.Args()...)...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: tulled cleanup: %w: %s", n.Name, err, out)
	}
	return nil
}

// Status fetches the node's status document.
func (n *Node) Status(ctx context.Context) (*api.Status, error) {
	return api.Get(ctx, filepath.Join(n.RunDir, api.SocketName))
}

// WaitPeers polls the status socket until the node has want peers.
func (n *Node) WaitPeers(ctx context.Context, want int) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var last string
	for {
		if !n.Running() {
			return fmt.Errorf("%s: tulled exited (%v); log:\n%s", n.Name, n.exitErr, n.Log())
		}
		s, err := n.Status(ctx)
		if err == nil && len(s.Peers) == want {
			return nil
		}
		if err != nil {
			last = err.Error()
		} else {
			last = fmt.Sprintf("%d peers", len(s.Peers))
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: waiting for %d peers: %s; log:\n%s", n.Name, want, last, n.Log())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Subnets returns the node's leased subnets (IPv4 first) from its status.
func (n *Node) Subnets(ctx context.Context) ([]netip.Prefix, error) {
	s, err := n.Status(ctx)
	if err != nil {
		return nil, err
	}
	return s.Lease.Subnets(), nil
}

// Addr returns the node's overlay address of one family: the first address
// of its subnet, which tulled puts on its TUN device.
func (n *Node) Addr(ctx context.Context, v6 bool) (netip.Addr, error) {
	subs, err := n.Subnets(ctx)
	if err != nil {
		return netip.Addr{}, err
	}
	i := slices.IndexFunc(subs, func(p netip.Prefix) bool { return p.Addr().Is6() == v6 })
	if i < 0 {
		return netip.Addr{}, fmt.Errorf("%s: no %s subnet", n.Name, map[bool]string{false: "IPv4", true: "IPv6"}[v6])
	}
	return subs[i].Addr(), nil
}

// ProcStatusKB reads one "Key: N kB" line of /proc/PID/status (0 if
// absent), such as "VmRSS:" or "VmHWM:".
func ProcStatusKB(pid int, key string) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, key); ok {
			kb, _ := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
			return kb
		}
	}
	return 0
}

// ProcCPUSeconds returns the CPU time, user and system, that process pid
// has used (0 if it is gone).
func ProcCPUSeconds(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// Fields after the ")" that closes comm: state is field 3, utime 14, stime 15.
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(f) <= 12 {
		return 0
	}
	u, _ := strconv.ParseFloat(f[11], 64)
	k, _ := strconv.ParseFloat(f[12], 64)
	return (u + k) / ClockTicks
}

// ClockTicks is USER_HZ, the unit of /proc's CPU times (100 on Linux).
const ClockTicks = 100.0

// Log returns the tail of the node's log.
func (n *Node) Log() string {
	b, _ := os.ReadFile(n.LogPath)
	s := string(b)
	if len(s) > 4000 {
		s = "…" + s[len(s)-4000:]
	}
	return strings.TrimSpace(s)
}

// Close stops every tulled (SIGTERM), runs cleanup on each node and removes
// the topology. It is safe to call more than once.
func (c *Cluster) Close() error {
	return errors.Join(c.Stop(), c.Topo.Close())
}

// Stop stops every tulled (SIGTERM) and runs cleanup on each node, leaving
// the topology (other clusters may share it).
func (c *Cluster) Stop() error {
	var errs []error
	for _, n := range c.Nodes {
		if err := n.Stop(syscall.SIGTERM); err != nil {
			errs = append(errs, err)
		}
	}
	for _, n := range c.Nodes {
		if err := n.Cleanup(); err != nil && !strings.Contains(err.Error(), "namespace") {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// TB is the part of testing.TB CloseFor needs.
type TB interface {
	Failed() bool
	Logf(format string, args ...any)
	Errorf(format string, args ...any)
}

// CloseFor closes the cluster at the end of a test, first logging every
// node's tulled log if the test failed.
func (c *Cluster) CloseFor(t TB) {
	if t.Failed() {
		for _, n := range c.Nodes {
			t.Logf("log of %s:\n%s", n.Name, n.Log())
		}
	}
	if err := c.Close(); err != nil {
		t.Errorf("cluster cleanup: %v", err)
	}
}
