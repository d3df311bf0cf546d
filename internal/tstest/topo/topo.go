// Package topo builds throwaway multi-node topologies on one host: a network
// namespace per node, joined by veth pairs to a bridge in a namespace of its
// own (the underlay, 198.18.0.0/24 and fd00:198::/64). The e2e tests, the
// demo and the benchmark harness use it.
//
// Everything it creates carries a random suffix, so parallel and aborted
// runs do not collide, and Close removes all of it (deleting a namespace
// takes its links with it). It never touches the host's own interfaces.
package topo

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"

	"github.com/vishvananda/netns"
)

// Options shape a topology.
type Options struct {
	Nodes int
	// MTU of the underlay links (default 1500).
	MTU int
	// Prefix starts the namespace names (default "tulle").
	Prefix string
	// Routed nodes are added after the bridged ones, behind a router
	// (AddRoutedNode).
	Routed int
}

// Topology is a set of node namespaces on one bridged underlay.
type Topology struct {
	Suffix string
	Bridge string // namespace holding the bridge
	Nodes  []*Node
	nss    []string
	prefix string
	mtu    int
	router string // namespace of the router to routed nodes, once made
	routed int
}

// Node is one namespace on the underlay.
type Node struct {
	Name string // short name: n1, n2, …
	NS   string // namespace name
	IP4  netip.Addr
	IP6  netip.Addr
	Link string // underlay interface inside the namespace
	// Port is the other end of Link, in namespace PortNS (the bridge's,
	// or the router's for routed nodes).
	Port   string
	PortNS string
}

// Require returns why this host cannot build topologies, or "".
func Require() string {
	if os.Geteuid() != 0 {
		return "needs root (network namespaces)"
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return "needs iproute2's ip"
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		return "needs /dev/net/tun"
	}
	return ""
}

// New builds a topology. On error, whatever was built is removed.
func New(opt Options) (t *Topology, err error) {
	if opt.Nodes < 1 {
		return nil, errors.New("topo: need at least one node")
	}
	if opt.Nodes > 200 {
		return nil, errors.New("topo: at most 200 nodes")
	}
	if opt.MTU == 0 {
		opt.MTU = 1500
	}
	if opt.Prefix == "" {
		opt.Prefix = "tulle"
	}
	var rnd [3]byte
	rand.Read(rnd[:])
	t = &Topology{Suffix: hex.EncodeToString(rnd[:])}
	defer func() {
		if err != nil {
			t.Close()
			t = nil
		}
	}()
	t.Bridge = fmt.Sprintf("%s-%s-br", opt.Prefix, t.Suffix)
	if err = t.addNS(t.Bridge); err != nil {
		return t, err
	}
	if err = run("ip", "-n", t.Bridge, "link", "add", "br0", "mtu", fmt.Sprint(opt.MTU), "type", "bridge"); err != nil {
		return t, err
	}
	if err = run("ip", "-n", t.Bridge, "link", "set", "br0", "up"); err != nil {
		return t, err
	}
	t.prefix, t.mtu = opt.Prefix, opt.MTU
	for range opt.Nodes {
		if _, err = t.AddNode(); err != nil {
			return t, err
		}
	}
	for range opt.Routed {
		if _, err = t.AddRoutedNode(); err != nil {
			return t, err
		}
	}
	return t, nil
}

// AddNode adds one more node namespace on the underlay.
func (t *Topology) AddNode() (*Node, error) {
	i := len(t.Nodes) + 1
	if i > 250 {
		return nil, errors.New("topo: underlay full")
	}
	n := &Node{
		Name:   fmt.Sprintf("n%d", i),
		NS:     fmt.Sprintf("%s-%s-n%d", t.prefix, t.Suffix, i),
		IP4:    netip.AddrFrom4([4]byte{198, 18, 0, byte(i)}),
		IP6:    netip.MustParseAddr(fmt.Sprintf("fd00:198::%x", i)),
		Link:   "eth0",
		Port:   fmt.Sprintf("p%d", i),
		PortNS: t.Bridge,
	}
	if err := t.addNS(n.NS); err != nil {
		return nil, err
	}
	port := n.Port
	mtu := fmt.Sprint(t.mtu)
	for _, c := range [][]string{
		{"ip", "-n", n.NS, "link", "set", "lo", "up"},
		{"ip", "-n", n.NS, "link", "add", n.Link, "mtu", mtu, "type", "veth", "peer", "name", port, "mtu", mtu, "netns", t.Bridge},
		{"ip", "-n", t.Bridge, "link", "set", port, "master", "br0", "up"},
		{"ip", "-n", n.NS, "addr", "add", n.IP4.String() + "/24", "dev", n.Link},
		{"ip", "-n", n.NS, "addr", "add", n.IP6.String() + "/64", "dev", n.Link, "nodad"},
		{"ip", "-n", n.NS, "link", "set", n.Link, "up"},
	} {
		if err := run(c[0], c[1:]...); err != nil {
			return nil, err
		}
	}
	if t.router != "" {
		if err := n.routeVia(routedNet4, routedNet6, routerIP4, routerIP6); err != nil {
			return nil, err
		}
	}
	t.Nodes = append(t.Nodes, n)
	return n, nil
}

// Routed nodes sit behind a router namespace on the underlay bridge: they
// share no L2 segment with the bridged nodes, as in a cluster spread over
// racks or subnets.
var (
	routerIP4   = netip.MustParseAddr("198.18.0.254")
	routerIP6   = netip.MustParseAddr("fd00:198::fe")
	routedNet4  = netip.MustParsePrefix("198.19.0.0/16")
	routedNet6  = netip.MustParsePrefix("fd00:199::/32")
	bridgeNet4  = netip.MustParsePrefix("198.18.0.0/24")
	bridgeNet6  = netip.MustParsePrefix("fd00:198::/64")
	routedLinks = "eth0"
)

// Router returns the namespace of the router in front of the routed
// nodes ("" before the first).
func (t *Topology) Router() string { return t.router }

// AddRoutedNode adds a node behind a router: its own /24 (198.19.k.0/24,
// fd00:199:k::/64) on a link to the router, which also sits on the bridge.
// Every bridged node routes the routed range through the router.
func (t *Topology) AddRoutedNode() (*Node, error) {
	if t.router == "" {
		t.router = fmt.Sprintf("%s-%s-rt", t.prefix, t.Suffix)
		if err := t.addNS(t.router); err != nil {
			return nil, err
		}
		mtu := fmt.Sprint(t.mtu)
		for _, c := range [][]string{
			{"ip", "-n", t.router, "link", "set", "lo", "up"},
			{"ip", "-n", t.router, "link", "add", "eth0", "mtu", mtu, "type", "veth", "peer", "name", "prt", "mtu", mtu, "netns", t.Bridge},
			{"ip", "-n", t.Bridge, "link", "set", "prt", "master", "br0", "up"},
			{"ip", "-n", t.router, "addr", "add", routerIP4.String() + "/24", "dev", "eth0"},
			{"ip", "-n", t.router, "addr", "add", routerIP6.String() + "/64", "dev", "eth0", "nodad"},
			{"ip", "-n", t.router, "link", "set", "eth0", "up"},
			{"ip", "netns", "exec", t.router, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"},
		} {
			if err := run(c[0], c[1:]...); err != nil {
				return nil, err
			}
		}
		for _, n := range t.Nodes {
			if n.IP4.Is4() && bridgeNet4.Contains(n.IP4) {
				if err := n.routeVia(routedNet4, routedNet6, routerIP4, routerIP6); err != nil {
					return nil, err
				}
			}
		}
	}
	t.routed++
	k := t.routed
	i := len(t.Nodes) + 1
	n := &Node{
		Name:   fmt.Sprintf("n%d", i),
		NS:     fmt.Sprintf("%s-%s-n%d", t.prefix, t.Suffix, i),
		IP4:    netip.AddrFrom4([4]byte{198, 19, byte(k), 2}),
		IP6:    netip.MustParseAddr(fmt.Sprintf("fd00:199:%x::2", k)),
		Link:   routedLinks,
		Port:   fmt.Sprintf("r%d", k),
		PortNS: t.router,
	}
	if err := t.addNS(n.NS); err != nil {
		return nil, err
	}
	mtu := fmt.Sprint(t.mtu)
	rl := n.Port
	for _, c := range [][]string{
		{"ip", "-n", n.NS, "link", "set", "lo", "up"},
		{"ip", "-n", n.NS, "link", "add", n.Link, "mtu", mtu, "type", "veth", "peer", "name", rl, "mtu", mtu, "netns", t.router},
		{"ip", "-n", t.router, "addr", "add", fmt.Sprintf("198.19.%d.1/24", k), "dev", rl},
		{"ip", "-n", t.router, "addr", "add", fmt.Sprintf("fd00:199:%x::1/64", k), "dev", rl, "nodad"},
		{"ip", "-n", t.router, "link", "set", rl, "up"},
		{"ip", "-n", n.NS, "addr", "add", n.IP4.String() + "/24", "dev", n.Link},
		{"ip", "-n", n.NS, "addr", "add", n.IP6.String() + "/64", "dev", n.Link, "nodad"},
		{"ip", "-n", n.NS, "link", "set", n.Link, "up"},
		{"ip", "-n", n.NS, "route", "add", "default", "via", fmt.Sprintf("198.19.%d.1", k)},
		{"ip", "-n", n.NS, "-6", "route", "add", "default", "via", fmt.Sprintf("fd00:199:%x::1", k)},
	} {
		if err := run(c[0], c[1:]...); err != nil {
			return nil, err
		}
	}
	t.Nodes = append(t.Nodes, n)
	return n, nil
}

// routeVia routes the given ranges through a gateway.
func (n *Node) routeVia(net4, net6 netip.Prefix, gw4, gw6 netip.Addr) error {
	if err := run("ip", "-n", n.NS, "route", "add", net4.String(), "via", gw4.String()); err != nil {
		return err
	}
	return run("ip", "-n", n.NS, "-6", "route", "add", net6.String(), "via", gw6.String())
}

func (t *Topology) addNS(name string) error {
	if err := run("ip", "netns", "add", name); err != nil {
		return err
	}
	t.nss = append(t.nss, name)
	return nil
}

// Close removes every namespace the topology made (and so its links).
// Processes still running in them must be stopped by their owners first.
func (t *Topology) Close() error {
	var errs []error
	for i := len(t.nss) - 1; i >= 0; i-- {
		if err := run("ip", "netns", "del", t.nss[i]); err != nil && !strings.Contains(err.Error(), "No such file") {
			errs = append(errs, err)
		}
	}
	t.nss = nil
	return errors.Join(errs...)
}

// Command returns cmd to run inside the node's namespace.
func (n *Node) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", n.NS, name}, args...)...)
}

// Run runs a command in the namespace and returns its combined output.
func (n *Node) Run(name string, args ...string) (string, error) {
	out, err := n.Command(context.Background(), name, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s in %s: %w: %s", name, strings.Join(args, " "), n.NS, err, bytes.TrimSpace(out))
	}
	return string(out), nil
}

// Do runs fn on an OS thread switched into the namespace. Sockets fn
// creates stay in that namespace for their whole life, so a test can dial
// from one node to another in-process.
func (n *Node) Do(fn func() error) error {
	return DoIn(n.NS, fn)
}

// DoIn runs fn inside the named namespace.
func DoIn(name string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		// The thread stays locked and dies with the goroutine if it could
		// not be switched back, so no other goroutine runs in the namespace.
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			errc <- err
			return
		}
		defer orig.Close()
		target, err := netns.GetFromName(name)
		if err != nil {
			errc <- fmt.Errorf("namespace %s: %w", name, err)
			return
		}
		defer target.Close()
		if err := netns.Set(target); err != nil {
			errc <- err
			return
		}
		ferr := fn()
		if err := netns.Set(orig); err == nil {
			runtime.UnlockOSThread()
		}
		errc <- ferr
	}()
	return <-errc
}

// Listen opens a TCP listener inside the namespace.
func (n *Node) Listen(addr string) (net.Listener, error) {
	var ln net.Listener
	err := n.Do(func() (err error) { ln, err = net.Listen("tcp", addr); return err })
	return ln, err
}

// Dial opens a TCP connection from inside the namespace.
func (n *Node) Dial(ctx context.Context, addr string) (net.Conn, error) {
	var c net.Conn
	err := n.Do(func() (err error) {
		var d net.Dialer
		c, err = d.DialContext(ctx, "tcp", addr)
		return err
	})
	return c, err
}

// WireLike makes every node's underlay link behave like a NIC's wire:
// segmentation offloads (TSO, GSO, USO) off at both ends, so packets cross
// one MTU-sized packet at a time, and GRO off at the far end (the bridge or
// router) so nothing is coalesced on the way. Receive-side GRO on the
// nodes stays as a NIC's would be.
func (t *Topology) WireLike() error {
	segOff := []string{"tso", "off", "gso", "off", "tx-udp-segmentation", "off"}
	for _, n := range t.Nodes {
		if err := run("ip", append([]string{"netns", "exec", n.NS, "ethtool", "-K", n.Link}, segOff...)...); err != nil {
			return fmt.Errorf("wire-like underlay on %s: %w", n.Name, err)
		}
		if err := run("ip", append([]string{"netns", "exec", n.PortNS, "ethtool", "-K", n.Port, "gro", "off"}, segOff...)...); err != nil {
			return fmt.Errorf("wire-like underlay on %s's far end: %w", n.Name, err)
		}
	}
	return nil
}

// Loss drops pct percent of the packets arriving on every node's underlay
// link, at random: an nftables rule on the netdev ingress hook (numgen
// random, in parts per million), which needs no sch_netem. The rules go
// with the namespaces.
func (t *Topology) Loss(pct float64) error {
	if pct <= 0 || pct > 100 {
		return fmt.Errorf("loss %g%%: want more than 0, at most 100", pct)
	}
	ppm := int(pct*10000 + 0.5)
	for _, n := range t.Nodes {
		rules := fmt.Sprintf("table netdev tulle_loss {\n\tchain ingress {\n\t\ttype filter hook ingress device %q priority 0;\n\t\tnumgen random mod 1000000 < %d drop\n\t}\n}\n", n.Link, ppm)
		cmd := n.Command(context.Background(), "nft", "-f", "-")
		cmd.Stdin = strings.NewReader(rules)
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("packet loss on %s: nft: %w: %s", n.Name, err, bytes.TrimSpace(out))
		}
	}
	return nil
}

func run(name string, args ...string) error {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return nil
}
