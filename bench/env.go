package bench

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/tulle-net/tulle/internal/netconf"
	"github.com/tulle-net/tulle/internal/tstest/cluster"
	"github.com/tulle-net/tulle/internal/tstest/topo"
	"github.com/tulle-net/tulle/internal/tstest/wggo"
)

// Path names, as reports use them. Later backends add theirs here
// (tulle-wireguard, wireguard-go).
const (
	PathRaw            = "raw"
	PathKernelVXLAN    = "kernel-vxlan"
	PathTulleUDP       = "tulle-udp"
	PathTulleHostGW    = "tulle-hostgw"
	PathTulleVXLAN     = "tulle-vxlan"
	PathTulleVXLANUser = "tulle-vxlan-userspace"
	PathTulleWireGuard = "tulle-wireguard"
	// PathWireGuardGo is the stock wireguard-go (the version tulle
	// depends on), configured with wg: the reference for tulle-wireguard.
	PathWireGuardGo = "wireguard-go"
)

// pathDef is a path the harness knows how to set up.
type pathDef struct {
	name string
	// backend is the tulle backend type, or "" for a reference path.
	backend string
	// netConf is the cluster network of the path's tulleds: each tulle
	// path runs its own tulled per node, with its own network, TUN and
	// port, so the paths never share routes.
	netConf string
	tun     string
	// args are extra tulled flags of the path.
	args []string
}

var knownPaths = []pathDef{
	{name: PathRaw},
	{name: PathKernelVXLAN},
	{name: PathTulleUDP, backend: netconf.BackendUDP, netConf: cluster.DefaultNetConf, tun: "tulle0"},
	{name: PathTulleHostGW, backend: netconf.BackendHostGW, tun: "tullehg0",
		netConf: `{"Network":"100.112.0.0/12","SubnetLen":24,"EnableIPv6":true,"IPv6Network":"fd00:97::/56","IPv6SubnetLen":64,"Backend":{"Type":"host-gw","Port":8286}}`},
	// tulle's kernel VXLAN takes port 8473: the kernel-vxlan reference
	// holds flannel's 8472 in the same run.
	{name: PathTulleVXLAN, backend: netconf.BackendVXLAN, tun: "tullevx0",
		netConf: `{"Network":"100.80.0.0/12","SubnetLen":24,"EnableIPv6":true,"IPv6Network":"fd00:98::/56","IPv6SubnetLen":64,"Backend":{"Type":"vxlan","Port":8287,"VXLANPort":8473}}`},
	// VXLAN spoken by tulled's datapath at both ends (as a node without
	// the kernel module would), on port 8474.
	{name: PathTulleVXLANUser, backend: netconf.BackendVXLAN, tun: "tulleuv0", args: []string{"--kernel-vxlan=false"},
		netConf: `{"Network":"100.72.0.0/13","SubnetLen":24,"EnableIPv6":true,"IPv6Network":"fd00:99::/56","IPv6SubnetLen":64,"Backend":{"Type":"vxlan","Port":8288,"VXLANPort":8474}}`},
	{name: PathTulleWireGuard, backend: netconf.BackendWireGuard, tun: "tullewg0",
		netConf: `{"Network":"100.68.0.0/14","SubnetLen":24,"EnableIPv6":true,"IPv6Network":"fd00:9a::/56","IPv6SubnetLen":64,"Backend":{"Type":"wireguard","Port":51820}}`},
	{name: PathWireGuardGo},
}

// SupportedPaths returns the paths this build can measure, in report order.
func SupportedPaths() []string {
	var out []string
	for _, p := range knownPaths {
		if p.backend == "" || slices.Contains(netconf.Types(), p.backend) {
			out = append(out, p.name)
		}
	}
	return out
}

// ValidatePaths checks a user's path selection.
func ValidatePaths(names []string) error {
	if len(names) == 0 {
		return errors.New("no path selected")
	}
	sup := SupportedPaths()
	for _, n := range names {
		if !slices.Contains(sup, n) {
			return fmt.Errorf("path %q is not supported by this build (supported: %s)", n, strings.Join(sup, ", "))
		}
	}
	return nil
}

// Path is one configured way from node 1 to node 2.
type Path struct {
	Name string
	// Dst is the address on node 2 that clients connect to.
	Dst netip.Addr
	// Addrs are every node's addresses on the path, by node (the
	// all-to-all figure).
	Addrs []netip.Addr
	// Tulle reports whether tulled carries the traffic (CPU and RSS figures
	// apply).
	Tulle bool
	// MTU is the path's inner MTU: the largest packet it carries
	// unfragmented between Dst and node 1.
	MTU int
	// cluster runs the path's tulleds, if any.
	cluster *cluster.Cluster
}

// EnvOptions configure an Env.
type EnvOptions struct {
	Nodes  int      // 2 to 8
	Paths  []string // path names, SupportedPaths() if empty
	Tulled string   // tulled binary (needed for tulle paths)
	Dir    string   // scratch directory: leases, tulled logs
	MTU    int      // underlay MTU (1500 if 0)
	// NetemDelayMS and NetemLossPct, when > 0, put a netem qdisc on every
	// node's underlay link.
	NetemDelayMS float64
	NetemLossPct float64
	// Wire turns the segmentation offloads (TSO, GSO, USO) off on both
	// ends of every underlay link, so single packets cross as on a real
	// NIC's wire instead of whole GSO super-packets.
	Wire bool
	// LossPct, when > 0, drops that share of the packets arriving on every
	// underlay link, at random (an nftables netdev ingress rule: works
	// where sch_netem is missing).
	LossPct float64
	// TulledArgs are extra tulled flags.
	TulledArgs []string
	Progress   func(string)
}

// Env is a cluster of namespaces with every selected path configured.
type Env struct {
	Topo     *topo.Topology
	Paths    []Path
	clusters []*cluster.Cluster
	wgGo     *wireguardGo
}

// Setup builds the environment. On error everything built is removed.
func Setup(ctx context.Context, opt EnvOptions) (env *Env, err error) {
	if opt.Nodes == 0 {
		opt.Nodes = 2
	}
	if opt.Nodes < 2 || opt.Nodes > 8 {
		return nil, fmt.Errorf("nodes: %d, want 2 to 8", opt.Nodes)
	}
	if len(opt.Paths) == 0 {
		opt.Paths = SupportedPaths()
	}
	if err := ValidatePaths(opt.Paths); err != nil {
		return nil, err
	}
	progress := opt.Progress
	if progress == nil {
		progress = func(string) {}
	}
	progress(fmt.Sprintf("building %d nodes in network namespaces (underlay MTU %d)", opt.Nodes, max(opt.MTU, 1500)))
	tp, err := topo.New(topo.Options{Nodes: opt.Nodes, MTU: opt.MTU, Prefix: "tullebench"})
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
	if opt.NetemDelayMS > 0 || opt.NetemLossPct > 0 {
		args := []string{"qdisc", "replace", "dev", "eth0", "root", "netem"}
		if opt.NetemDelayMS > 0 {
			args = append(args, "delay", strconv.FormatFloat(opt.NetemDelayMS, 'f', -1, 64)+"ms")
		}
		if opt.NetemLossPct > 0 {
			args = append(args, "loss", strconv.FormatFloat(opt.NetemLossPct, 'f', -1, 64)+"%")
		}
		progress(fmt.Sprintf("netem on every underlay link: %s", strings.Join(args[6:], " ")))
		for _, n := range tp.Nodes {
			if _, err := n.Run("tc", args...); err != nil {
				return env, fmt.Errorf("netem: %w (this kernel may lack sch_netem: use --loss, which needs only nftables)", err)
			}
		}
	}
	if opt.Wire {
		progress("wire-like underlay: TSO, GSO and USO off on every underlay link")
		if err := tp.WireLike(); err != nil {
			return env, err
		}
	}
	if opt.LossPct > 0 {
		progress(fmt.Sprintf("%g%% random loss on every underlay link (nftables netdev ingress)", opt.LossPct))
		if err := tp.Loss(opt.LossPct); err != nil {
			return env, err
		}
	}
	b := tp.Nodes[1]
	underlay := opt.MTU
	if underlay == 0 {
		underlay = 1500
	}
	for _, name := range opt.Paths {
		switch name {
		case PathRaw:
			var addrs []netip.Addr
			for _, n := range tp.Nodes {
				addrs = append(addrs, n.IP4)
			}
			env.Paths = append(env.Paths, Path{Name: name, Dst: b.IP4, Addrs: addrs, MTU: underlay})
		case PathKernelVXLAN:
			progress(fmt.Sprintf("configuring kernel VXLAN as flannel does (VNI 1, port 8472, MTU %d, 100.64.0.0/24)", underlay-vxlanOverhead))
			if err := kernelVXLAN(tp, underlay-vxlanOverhead); err != nil {
				return env, err
			}
			var addrs []netip.Addr
			for i := range tp.Nodes {
				addrs = append(addrs, netip.AddrFrom4([4]byte{100, 64, 0, byte(i + 1)}))
			}
			env.Paths = append(env.Paths, Path{Name: name, Dst: addrs[1], Addrs: addrs, MTU: underlay - vxlanOverhead})
		case PathWireGuardGo:
			mtu := underlay - 60
			progress(fmt.Sprintf("building the stock wireguard-go and configuring it with wg on every node (port %d, MTU %d, 100.67.0.0/24)", wgGoPort, mtu))
			bin, err := wggo.Build(ctx, opt.Dir, opt.Tulled)
			if err != nil {
				return env, err
			}
			w, addrs, err := startWireguardGo(ctx, tp, bin, mtu)
			env.wgGo = w
			if err != nil {
				return env, err
			}
			env.Paths = append(env.Paths, Path{Name: name, Dst: addrs[1], Addrs: addrs, Tulle: true, MTU: mtu})
		case PathTulleUDP, PathTulleHostGW, PathTulleVXLAN, PathTulleVXLANUser, PathTulleWireGuard:
			i := slices.IndexFunc(knownPaths, func(d pathDef) bool { return d.name == name })
			c, err := env.startTulle(ctx, opt, knownPaths[i], progress)
			if err != nil {
				return env, err
			}
			var addrs []netip.Addr
			for _, n := range c.Nodes {
				a, err := n.Addr(ctx, false)
				if err != nil {
					return env, err
				}
				addrs = append(addrs, a)
			}
			dst := addrs[1]
			mtu := underlay // host-gw: plain routes over the underlay
			switch name {
			case PathTulleUDP, PathTulleWireGuard:
				st, err := c.Nodes[0].Status(ctx)
				if err != nil {
					return env, err
				}
				mtu = st.MTU
			case PathTulleVXLAN, PathTulleVXLANUser:
				mtu = underlay - vxlanOverhead
			}
			// host-gw and kernel vxlan: the kernel carries the traffic;
			// tulled only programs it.
			env.Paths = append(env.Paths, Path{Name: name, Dst: dst, Addrs: addrs, Tulle: name == PathTulleUDP || name == PathTulleVXLANUser || name == PathTulleWireGuard, MTU: mtu, cluster: c})
		}
	}
	return env, nil
}

// vxlanOverhead is what VXLAN over IPv4 adds (outer IP, UDP, VXLAN and
// inner Ethernet headers): flannel's inner MTU rule is underlay − 50.
const vxlanOverhead = 50

// kernelVXLAN configures a full mesh of unicast VXLAN on every node, as an
// operator would (an all-zeros FDB entry per peer), in 100.64.0.0/24, with
// flannel's VNI 1 and port 8472 so the reference is the one flannel users
// run.
func kernelVXLAN(tp *topo.Topology, mtu int) error {
	for i, n := range tp.Nodes {
		cmds := [][]string{{"ip", "link", "add", "tvx0", "mtu", fmt.Sprint(mtu), "type", "vxlan", "id", "1", "dstport", "8472", "local", n.IP4.String(), "dev", n.Link}}
		for _, p := range tp.Nodes {
			if p != n {
				cmds = append(cmds, []string{"bridge", "fdb", "append", "00:00:00:00:00:00", "dev", "tvx0", "dst", p.IP4.String()})
			}
		}
		cmds = append(cmds,
			[]string{"ip", "addr", "add", fmt.Sprintf("100.64.0.%d/24", i+1), "dev", "tvx0"},
			[]string{"ip", "link", "set", "tvx0", "up"})
		for _, c := range cmds {
			if _, err := n.Run(c[0], c[1:]...); err != nil {
				return fmt.Errorf("kernel vxlan on %s: %w", n.Name, err)
			}
		}
	}
	return nil
}

// startTulle runs the tulleds of one tulle path on every node.
func (e *Env) startTulle(ctx context.Context, opt EnvOptions, d pathDef, progress func(string)) (*cluster.Cluster, error) {
	if opt.Tulled == "" {
		return nil, errors.New("tulle paths need the tulled binary")
	}
	if _, err := os.Stat(opt.Tulled); err != nil {
		return nil, fmt.Errorf("tulled binary: %w", err)
	}
	progress(fmt.Sprintf("starting tulled (%s) on %d nodes", d.backend, len(e.Topo.Nodes)))
	args := append([]string{"--tun", d.tun}, d.args...)
	args = append(args, opt.TulledArgs...)
	c, err := cluster.New(e.Topo, cluster.Options{Tulled: opt.Tulled, Dir: filepath.Join(opt.Dir, d.name), NetConf: d.netConf, Args: args, DualStackUnderlay: true})
	if err != nil {
		return nil, err
	}
	e.clusters = append(e.clusters, c)
	return c, c.Start(ctx)
}

// TulledPIDs returns the PIDs of the tulled processes of path p.
func (e *Env) TulledPIDs(p Path) []int {
	if p.Name == PathWireGuardGo && e.wgGo != nil {
		return e.wgGo.pids()
	}
	if p.cluster == nil {
		return nil
	}
	var pids []int
	for _, n := range p.cluster.Nodes {
		if pid := n.PID(); pid > 0 {
			pids = append(pids, pid)
		}
	}
	return pids
}

// Close removes everything Setup made.
func (e *Env) Close() error {
	var errs []error
	for _, c := range e.clusters {
		errs = append(errs, c.Stop())
	}
	if e.wgGo != nil {
		errs = append(errs, e.wgGo.stop())
	}
	errs = append(errs, e.Topo.Close())
	return errors.Join(errs...)
}
