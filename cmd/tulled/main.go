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
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"time"

	"k8s.io/klog/v2"

	"github.com/tulle-net/tulle/encap/wireguard"
	"github.com/tulle-net/tulle/internal/netconf"
	"github.com/tulle-net/tulle/internal/version"
	"github.com/tulle-net/tulle/lease/local"
)

// options are the parsed command line.
type options struct {
	netConf    string
	node       string
	iface      string
	publicIP   string
	publicIPv6 string
	leaseStore string
	kubeconfig string
	kubeMode   string
	kubeNS     string
	leaseDir   string
	leaseTTL   time.Duration
	runDir     string
	tunName    string
	gro        bool
	tunQueues  int
	udpGSO     bool
	udpGRO     bool
	// kernelVXLAN allows the kernel's VXLAN where a probe finds it;
	// VXLAN is otherwise spoken in userspace.
	kernelVXLAN bool
	logLevel    string
	// wgKey is the WireGuard private key file (created when missing);
	// wgPSK an optional pre-shared key file.
	wgKey, wgPSK string
	// wgDevice is the WireGuard device used in kernel mode (created when
	// missing; an existing one of any implementation is configured as it is).
	wgDevice string
	// wgRekey is WireGuard's RekeyAfterTime (tests shorten it).
	wgRekey time.Duration
	// httpAddr serves /healthz, /readyz and /metrics ("" off).
	httpAddr  string
	logFormat string
	version   bool
	// networkPolicy enforces NetworkPolicy (with --lease-store kube).
	networkPolicy bool

	net *netconf.Config
	pub netip.Addr
	pb6 netip.Addr
}

// maxTUNQueues bounds --tun-queues: each queue is a loop with 1 MiB of
// buffers, and beyond a few the loops contend for the sockets.
const maxTUNQueues = 64

// configError is bad input: exit 2, one line.
type configError struct {
	msg string
	// usage, if set, prints the usage after the line (an unknown flag).
	usage func()
}

func (e *configError) Error() string { return e.msg }

func badConfig(format string, a ...any) error { return &configError{msg: fmt.Sprintf(format, a...)} }

func parseFlags(args []string, stderr io.Writer) (*options, error) {
	o := &options{}
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
	fs.StringVar(&o.node, "node-name", host, "this node's name in the lease store")
	fs.StringVar(&o.iface, "iface", "", "underlay interface (default: the one holding --public-ip, else the default route's)")
	fs.StringVar(&o.publicIP, "public-ip", "", "IPv4 underlay address peers send to (default: the first on --iface)")
	fs.StringVar(&o.publicIPv6, "public-ipv6", "", "IPv6 underlay address peers send to")
	fs.StringVar(&o.leaseStore, "lease-store", "local", "where leases live: local (a shared directory) or kube (the Kubernetes API)")
	fs.StringVar(&o.kubeconfig, "kubeconfig", "", "kubeconfig for --lease-store kube (default: in-cluster config)")
	fs.StringVar(&o.kubeMode, "kube-mode", "podcidr", "podcidr (subnets from Node.spec.podCIDRs) or lease (tulled claims subnets with Lease objects)")
	fs.StringVar(&o.kubeNS, "kube-namespace", DefaultNamespace, "namespace of the Lease objects in --kube-mode lease (tulle's own: its Role grants Leases there only)")
	fs.StringVar(&o.leaseDir, "lease-dir", "/var/lib/tulle/leases", "directory of the local lease store, shared by the nodes of a host")
	fs.DurationVar(&o.leaseTTL, "lease-ttl", local.DefaultTTL, "lease lifetime without renewal")
	fs.StringVar(&o.runDir, "run-dir", "/run/tulle", "directory for subnet.json and the status socket")
	fs.StringVar(&o.tunName, "tun", "tulle0", "TUN device name")
	fs.BoolVar(&o.gro, "tun-gro", true, "coalesce packets on TUN write (GRO) and pass UDP GSO through the TUN")
	fs.IntVar(&o.tunQueues, "tun-queues", 0, "TUN queues, each read by its own loop (0: one per CPU, at most 8; 1: single-queue)")
	fs.BoolVar(&o.udpGSO, "udp-gso", true, "send trains with UDP_SEGMENT")
	fs.BoolVar(&o.udpGRO, "udp-gro", true, "receive with UDP_GRO")
	fs.BoolVar(&o.kernelVXLAN, "kernel-vxlan", true, "use the kernel's VXLAN where a probe finds it (false, or no kernel VXLAN: tulled speaks VXLAN from its datapath)")
	fs.StringVar(&o.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.StringVar(&o.logFormat, "log-format", "text", "text or json (client-go's logs go the same way)")
	fs.StringVar(&o.httpAddr, "http-addr", "127.0.0.1:9107", "address for /healthz, /readyz and /metrics (empty: off)")
	fs.BoolVar(&o.version, "version", false, "print the version and exit")
	fs.BoolVar(&o.networkPolicy, "network-policy", true, "enforce Kubernetes NetworkPolicy on this node's pods (with --lease-store kube; needs nft)")
	fs.StringVar(&o.wgKey, "wireguard-key", "/var/lib/tulle/wireguard.key", "WireGuard private key file (Backend.Type wireguard; created, mode 0600, when missing)")
	fs.StringVar(&o.wgDevice, "wireguard-device", wireguard.DeviceName, "WireGuard device for Backend.Mode kernel/auto (created where the kernel has WireGuard; an existing device of this name, of any implementation, is configured as it is)")
	fs.DurationVar(&o.wgRekey, "wireguard-rekey-after", wireguard.DefaultTimers.RekeyAfterTime, "renew WireGuard sessions this node initiated after this long (the protocol's 2m; shorter to exercise rekeying)")
	fs.StringVar(&o.wgPSK, "wireguard-psk", "", "WireGuard pre-shared key file (base64, as wg genpsk writes it), mixed into every handshake; all nodes alike")
	// An unknown flag: the caller prints one line, then the usage.
	fs.SetOutput(io.Discard)
	err := fs.Parse(args)
	fs.SetOutput(stderr)
	if errors.Is(err, flag.ErrHelp) {
		fs.Usage()
		return nil, err
	}
	if err != nil {
		return nil, &configError{msg: err.Error(), usage: fs.Usage}
	}
	if fs.NArg() > 0 {
		return nil, badConfig("unexpected argument %q", fs.Arg(0))
	}
	if o.version {
		return o, nil
	}
	if o.logFormat != "text" && o.logFormat != "json" {
		return nil, badConfig("flag --log-format: %q, want text or json", o.logFormat)
	}
	if o.tunQueues < 0 || o.tunQueues > maxTUNQueues {
		return nil, badConfig("flag --tun-queues: %d out of range 0-%d", o.tunQueues, maxTUNQueues)
	}
	if o.tunQueues == 0 {
		o.tunQueues = min(runtime.NumCPU(), 8)
	}
	if o.node == "" {
		return nil, badConfig("flag --node-name: empty (and no hostname)")
	}
	if strings.ContainsAny(o.node, "/\x00") {
		return nil, badConfig("flag --node-name: %q contains '/'", o.node)
	}
	if len(o.wgDevice) == 0 || len(o.wgDevice) > 15 || strings.ContainsAny(o.wgDevice, "/ \x00") {
		return nil, badConfig("flag --wireguard-device: %q is not a valid interface name", o.wgDevice)
	}
	if o.wgRekey < time.Second || o.wgRekey > wireguard.DefaultTimers.RekeyAfterTime {
		return nil, badConfig("flag --wireguard-rekey-after: %s out of range 1s-%s", o.wgRekey, wireguard.DefaultTimers.RekeyAfterTime)
	}
	if len(o.tunName) == 0 || len(o.tunName) > 15 || strings.ContainsAny(o.tunName, "/ \x00") {
		return nil, badConfig("flag --tun: %q is not a valid interface name (1-15 characters, no '/' or spaces)", o.tunName)
	}
	switch o.leaseStore {
	case "local", "kube":
	default:
		return nil, badConfig("flag --lease-store: %q, want local or kube", o.leaseStore)
	}
	if o.kubeMode != "podcidr" && o.kubeMode != "lease" {
		return nil, badConfig("flag --kube-mode: %q, want podcidr or lease", o.kubeMode)
	}
	if o.kubeconfig != "" {
		if _, err := os.Stat(o.kubeconfig); err != nil {
			return nil, badConfig("flag --kubeconfig: %v", err)
		}
	}
	if o.leaseTTL < 2*time.Second {
		return nil, badConfig("flag --lease-ttl: %s is too short (minimum 2s)", o.leaseTTL)
	}
	for _, f := range []struct {
		name, val string
		v6        bool
		dst       *netip.Addr
	}{{"--public-ip", o.publicIP, false, &o.pub}, {"--public-ipv6", o.publicIPv6, true, &o.pb6}} {
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
	c, err := netconf.Load(o.netConf)
	if err != nil {
		return nil, badConfig("%v", err)
	}
	o.net = c
	if c.Backend.Type == netconf.BackendWireGuard {
		if _, err := wireguard.ReadKeyFile(o.wgKey); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, badConfig("flag --wireguard-key: %v", err)
		}
		if o.wgPSK != "" {
			if _, err := wireguard.ReadPSKFile(o.wgPSK); err != nil {
				return nil, badConfig("flag --wireguard-psk: %v", err)
			}
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
		if ce, ok := err.(*configError); ok && ce.usage != nil {
			ce.usage()
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
	log := slog.New(handler).With("node", o.node)
	slog.SetDefault(log)
	// client-go logs through klog: into the same handler, one format.
	klog.SetSlogLogger(log)
	if cmd == "cleanup" {
		err = cleanup(o, log)
	} else {
		err = run(o, log)
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
