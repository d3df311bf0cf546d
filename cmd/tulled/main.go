// Command tulled is tulle's node daemon: it leases the node's pod subnet,
// runs the userspace datapath between a TUN device and the underlay, and
// keeps the device, its addresses and routes in place.
//
//	tulled [run] [flags]     run
//	tulled cleanup [flags]   remove what tulled added on this node
//	tulled --version
//
// Exit status: 0 on a clean stop, 2 for bad configuration (nothing was
// created), 1 for anything else.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"syscall"
	"time"

	"k8s.io/klog/v2"

	table "github.com/tulle-net/tulle/encap/backends"
	"github.com/tulle-net/tulle/internal/netconf"
	"github.com/tulle-net/tulle/internal/version"
	"github.com/tulle-net/tulle/lease/local"
	"github.com/tulle-net/tulle/node"
)

// options are the parsed command line: the node's configuration and
// what only the command reads.
type options struct {
	cfg       node.Config
	netConf   string
	publicIP  string
	publicIP6 string
	logLevel  string
	logFormat string
	version   bool
	// net is the parsed net-conf (cfg.Net).
	net *netconf.Config
}

// maxTUNQueues bounds --tun-queues: each queue is a loop with 1 MiB of
// buffers, and beyond a few the loops contend for the sockets.
const maxTUNQueues = 64

// configError is bad input: exit 2, one line.
type configError = netconf.ConfigError

func badConfig(format string, a ...any) error { return netconf.Errorf(format, a...) }

func parseFlags(args []string, stderr io.Writer) (*options, error) {
	o := &options{cfg: node.Config{Backends: table.New()}}
	c := &o.cfg
	var udpGSO, udpGRO bool
	fs := flag.NewFlagSet("tulled", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), `usage: tulled [run] [flags]      run the node daemon (the default command)
       tulled cleanup [flags]    remove what tulled added on this node (same flags)
       tulled --version

flags:
`)
		fs.PrintDefaults()
	}
	host, _ := os.Hostname()
	fs.StringVar(&o.netConf, "net-conf", "/etc/tulle/net-conf.json", "path of net-conf.json")
	fs.StringVar(&c.Node, "node-name", host, "this node's name in the lease store")
	fs.StringVar(&c.Iface, "iface", "", "underlay interface (default: the one holding --public-ip, else the default route's)")
	fs.StringVar(&o.publicIP, "public-ip", "", "IPv4 underlay address peers send to (default: the first on --iface)")
	fs.StringVar(&o.publicIP6, "public-ipv6", "", "IPv6 underlay address peers send to")
	fs.StringVar(&c.LeaseStore, "lease-store", "local", "where leases live: local (a shared directory) or kube (the Kubernetes API)")
	fs.StringVar(&c.Kubeconfig, "kubeconfig", "", "kubeconfig for --lease-store kube (default: in-cluster config)")
	fs.StringVar(&c.KubeMode, "kube-mode", "podcidr", "podcidr (subnets from Node.spec.podCIDRs) or lease (tulled claims subnets with Lease objects)")
	fs.StringVar(&c.KubeNamespace, "kube-namespace", DefaultNamespace, "namespace of the Lease objects in --kube-mode lease (tulle's own: its Role grants Leases there only)")
	fs.StringVar(&c.LeaseDir, "lease-dir", "/var/lib/tulle/leases", "directory of the local lease store, shared by the nodes of a host")
	fs.DurationVar(&c.LeaseTTL, "lease-ttl", local.DefaultTTL, "lease lifetime without renewal")
	fs.StringVar(&c.RunDir, "run-dir", "/run/tulle", "directory for subnet.json and the status socket")
	fs.StringVar(&c.TUN, "tun", "tulle0", "TUN device name")
	fs.BoolVar(&c.TUNGRO, "tun-gro", true, "coalesce packets on TUN write (GRO) and pass UDP GSO through the TUN")
	fs.BoolVar(&c.TUNAQM, "tun-aqm", true, "signal a bulk flow that keeps a standing queue in the TUN (CoDel-like: ECN mark, else one TCP segment or packet left out)")
	fs.IntVar(&c.TUNQueues, "tun-queues", 0, "TUN queues, each read by its own loop; with several, the first carries sparse flows (pings, request/response) apart from bulk ones (0: one per CPU, at most 8, plus that one; 1: single-queue)")
	fs.BoolVar(&udpGSO, "udp-gso", true, "send trains with UDP_SEGMENT")
	fs.BoolVar(&udpGRO, "udp-gro", true, "receive with UDP_GRO")
	fs.StringVar(&o.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.StringVar(&o.logFormat, "log-format", "text", "text or json (client-go's logs go the same way)")
	fs.StringVar(&c.HTTPAddr, "http-addr", "127.0.0.1:9107", "address for /healthz, /readyz and /metrics (empty: off)")
	fs.BoolVar(&o.version, "version", false, "print the version and exit")
	fs.BoolVar(&c.NetworkPolicy, "network-policy", true, "enforce Kubernetes NetworkPolicy on this node's pods (with --lease-store kube; needs nft)")
	for _, b := range c.Backends {
		b.AddFlags(fs)
	}
	// An unknown flag: the caller prints one line, then the usage.
	fs.SetOutput(io.Discard)
	err := fs.Parse(args)
	fs.SetOutput(stderr)
	if errors.Is(err, flag.ErrHelp) {
		fs.Usage()
		return nil, err
	}
	if err != nil {
		return nil, &configError{Msg: err.Error(), Usage: fs.Usage}
	}
	if fs.NArg() > 0 {
		return nil, badConfig("unexpected argument %q", fs.Arg(0))
	}
	if o.version {
		return o, nil
	}
	c.DisableGSO, c.DisableGRO = !udpGSO, !udpGRO
	if o.logFormat != "text" && o.logFormat != "json" {
		return nil, badConfig("flag --log-format: %q, want text or json", o.logFormat)
	}
	if c.TUNQueues < 0 || c.TUNQueues > maxTUNQueues {
		return nil, badConfig("flag --tun-queues: %d out of range 0-%d", c.TUNQueues, maxTUNQueues)
	}
	if c.TUNQueues == 0 {
		c.TUNQueues = min(runtime.NumCPU(), 8) + 1 // and the sparse flows' queue
	}
	if c.Node == "" {
		return nil, badConfig("flag --node-name: empty (and no hostname)")
	}
	if strings.ContainsAny(c.Node, "/\x00") {
		return nil, badConfig("flag --node-name: %q contains '/'", c.Node)
	}
	if len(c.TUN) == 0 || len(c.TUN) > 15 || strings.ContainsAny(c.TUN, "/ \x00") {
		return nil, badConfig("flag --tun: %q is not a valid interface name (1-15 characters, no '/' or spaces)", c.TUN)
	}
	switch c.LeaseStore {
	case "local", "kube":
	default:
		return nil, badConfig("flag --lease-store: %q, want local or kube", c.LeaseStore)
	}
	if c.KubeMode != "podcidr" && c.KubeMode != "lease" {
		return nil, badConfig("flag --kube-mode: %q, want podcidr or lease", c.KubeMode)
	}
	if c.Kubeconfig != "" {
		if _, err := os.Stat(c.Kubeconfig); err != nil {
			return nil, badConfig("flag --kubeconfig: %v", err)
		}
	}
	if c.LeaseTTL < 2*time.Second {
		return nil, badConfig("flag --lease-ttl: %s is too short (minimum 2s)", c.LeaseTTL)
	}
	for _, f := range []struct {
		name, val string
		v6        bool
		dst       *netip.Addr
	}{{"--public-ip", o.publicIP, false, &c.PublicIP}, {"--public-ipv6", o.publicIP6, true, &c.PublicIPv6}} {
		if f.val == "" {
			continue
		}
		a, err := netip.ParseAddr(f.val)
		if err != nil || a.Is6() != f.v6 || a.Zone() != "" {
			return nil, badConfig("flag %s: %q is not an IPv%s address", f.name, f.val, map[bool]string{false: "4", true: "6"}[f.v6])
		}
		*f.dst = a
	}
	if _, err := slogLevel(o.logLevel); err != nil {
		return nil, badConfig("flag --log-level: %v", err)
	}
	n, err := netconf.Load(o.netConf)
	if err != nil {
		return nil, badConfig("%v", err)
	}
	o.net, c.Net = n, n
	for _, b := range c.Backends {
		if err := b.Check(n); err != nil {
			return nil, err
		}
	}
	return o, nil
}

// DefaultNamespace holds tulle's Leases (lease mode): a namespace of its
// own, so its RBAC never reaches the control plane's Leases in kube-system.
const DefaultNamespace = "tulle-system"

func slogLevel(s string) (slog.Level, error) {
	var l slog.Level
	err := l.UnmarshalText([]byte(s))
	return l, err
}

func main() {
	args := os.Args[1:]
	cmd := "run"
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		cmd, args = args[0], args[1:]
	}
	if cmd != "run" && cmd != "cleanup" {
		fmt.Fprintf(os.Stderr, "tulled: unknown command %q (want run or cleanup)\n", cmd)
		os.Exit(2)
	}
	o, err := parseFlags(args, os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "tulled: %v\n", err)
		if ce, ok := err.(*configError); ok && ce.Usage != nil {
			ce.Usage()
		}
		os.Exit(2)
	}
	if o.version {
		fmt.Println("tulled", version.String())
		return
	}
	level, _ := slogLevel(o.logLevel)
	hopts := &slog.HandlerOptions{Level: level}
	var handler slog.Handler = slog.NewTextHandler(os.Stderr, hopts)
	if o.logFormat == "json" {
		handler = slog.NewJSONHandler(os.Stderr, hopts)
	}
	log := slog.New(handler).With("node", o.cfg.Node)
	slog.SetDefault(log)
	// client-go logs through klog: into the same handler, one format.
	klog.SetSlogLogger(log)
	if cmd == "cleanup" {
		err = node.Cleanup(o.cfg, log)
	} else {
		ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
		err = node.Run(ctx, o.cfg, log)
		stop()
	}
	var ce *configError
	switch {
	case errors.As(err, &ce):
		fmt.Fprintf(os.Stderr, "tulled: %v\n", err)
		os.Exit(2)
	case err != nil:
		log.Error("tulled failed", "err", err)
		os.Exit(1)
	}
}
