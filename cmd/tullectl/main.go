// Command tullectl inspects and exercises tulle.
//
//	tullectl status [--run-dir DIR] [-o table|json]  a running tulled's lease, peers and counters
//	tullectl version
//	tullectl policy [--run-dir DIR] [NS/POD]  which NetworkPolicies select the node's pods, what they allow
//	tullectl rotate-key [--now] [--run-dir DIR]  a new WireGuard key for the node, published at once
//	tullectl leases [--lease-dir DIR]    the leases in a local store
//	tullectl demo [--tulled PATH]        a three-node overlay in namespaces, end to end
//	tullectl demo --kube [--root DIR]    the same in a real Kubernetes cluster (kubelet, containerd)
//	tullectl bench [--out DIR] [flags]   iperf3 over every path side by side, reports in DIR
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/tulle-net/tulle/internal/api"
	"github.com/tulle-net/tulle/internal/netconf"
	"github.com/tulle-net/tulle/internal/version"
	"github.com/tulle-net/tulle/lease/local"
)

func usage() {
	fmt.Fprintln(os.Stderr, `usage: tullectl <command> [flags]

commands:
  status       show a running tulled's lease, peers, traffic and counters (-o json for scripts)
  policy       show which NetworkPolicies select this node's pods and what each pod may send and receive
  rotate-key   give a running tulled a new WireGuard key (sessions carry on; --now: the old key answers no more handshakes)
  install-cni  copy the CNI plugin and conflist into the host's CNI directories (the DaemonSet's init container)
  leases       list the leases in a local lease store
  demo         run a three-node tulle overlay in network namespaces (root; --kube: in a real Kubernetes cluster)
  bench        measure raw veth, kernel VXLAN, tulle and wireguard-go side by side with iperf3 (root)
  version      print tullectl's version`)
}

func main() {
	if len(os.Args) < 2 {
		usage()
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch cmd, args := os.Args[1], os.Args[2:]; cmd {
	case "status":
		err = status(ctx, args)
	case "rotate-key":
		err = rotateKey(ctx, args)
	case "policy":
		err = policyCmd(ctx, args)
	case "install-cni":
		err = installCNI(args)
	case "version", "--version":
		fmt.Println("tullectl", version.String())
	case "leases":
		err = leases(args)
	case "demo":
		err = demo(ctx, args)
	case "bench":
		err = benchCmd(ctx, args)
	case "-h", "--help", "help":
		usage()
		return
	default:
		fmt.Fprintf(os.Stderr, "tullectl: unknown command %q\n", cmd)
		usage()
		os.Exit(2)
	}
	if errors.Is(err, flag.ErrHelp) {
		return
	}
	if err != nil && isFlagError(err) {
		os.Exit(2) // the flag package said it in one line, then the command's flags
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "tullectl: %v\n", err)
		os.Exit(1)
	}
}

func status(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	runDir := fs.String("run-dir", "/run/tulle", "tulled's run directory")
	output := fs.String("o", "table", "table, or json (the status document, for scripts)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *output != "table" && *output != "json" {
		return fmt.Errorf("status: -o %q, want table or json", *output)
	}
	s, err := api.Get(ctx, filepath.Join(*runDir, api.SocketName))
	if err != nil {
		return err
	}
	if *output == "json" {
		e := json.NewEncoder(os.Stdout)
		e.SetIndent("", "  ")
		return e.Encode(s)
	}
	return printStatus(os.Stdout, s, time.Now())
}

// isFlagError reports whether err is a command line the flag package
// refused (and has already printed with the command's flags).
func isFlagError(err error) bool {
	for _, p := range []string{"flag provided but not defined", "invalid value", "invalid boolean", "bad flag syntax", "flag needs an argument"} {
		if strings.HasPrefix(err.Error(), p) {
			return true
		}
	}
	return false
}

// printStatus writes the status as aligned tables: the node, then one row
// per peer, then the non-zero counters.
func printStatus(out io.Writer, s *api.Status, now time.Time) error {
	w := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	ready := "yes"
	if s.NotReady != "" {
		ready = "no: " + s.NotReady
	}
	fmt.Fprintf(w, "node\t%s\n", s.Node)
	fmt.Fprintf(w, "version\t%s (pid %d, up %s)\n", s.Version, s.PID, s.Uptime)
	fmt.Fprintf(w, "ready\t%s\n", ready)
	fmt.Fprintf(w, "lease\t%v, renewed %s, %s\n", s.Lease.Subnets(), ago(now, s.Lease.Renewed), expiry(now, s.Lease.Expiration))
	fmt.Fprintf(w, "mtu\t%d\n", s.MTU)
	if wg := s.WireGuard; wg != nil {
		fmt.Fprintf(w, "wireguard\t%s, port %d, key %s\n", wg.Mode, wg.Port, wg.PublicKey)
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "PEER\tBACKEND\tENDPOINT\tSUBNETS\tTX FRAMES\tTX BYTES\tRX FRAMES\tRX BYTES\tDROPS\tLAST SEEN\tKEY\tHANDSHAKE\tWHY")
	for _, p := range s.Peers {
		var subnets []string
		for _, n := range p.Subnets {
			subnets = append(subnets, n.String())
		}
		tr := p.Traffic
		if tr == nil {
			tr = &api.PeerTraffic{}
		}
		key, hs := "-", "-"
		why := p.Reason
		if wg := p.WireGuard; wg != nil {
			key, hs = wg.Fingerprint+"…", ago(now, wg.LastHandshake)
			if wg.Refused != "" {
				hs, why = "REFUSED", "WireGuard refuses this peer: "+wg.Refused
			}
		}
		endpoint := "-"
		if p.Endpoint.IsValid() {
			endpoint = p.Endpoint.String()
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%d\t%d\t%d\t%d\t%d\t%s\t%s\t%s\t%s\n", p.Name, backendOf(p), endpoint, strings.Join(subnets, ","),
			tr.TxFrames, tr.TxBytes, tr.RxFrames, tr.RxBytes, tr.Drops, ago(now, tr.LastSeen), key, hs, why)
	}
	names := make([]string, 0, len(s.Counters))
	for k, v := range s.Counters {
		if v != 0 {
			names = append(names, k)
		}
	}
	slices.Sort(names)
	fmt.Fprintln(w)
	fmt.Fprintln(w, "COUNTER\tVALUE")
	for _, k := range names {
		fmt.Fprintf(w, "%s\t%d\n", k, s.Counters[k])
	}
	return w.Flush()
}

// expiry says when a lease expires. A podcidr-mode lease has no expiry
// (the Node's pod CIDRs are the lease; its Expiration is far in the
// future), nor has one without an Expiration.
func expiry(now, t time.Time) string {
	switch d := t.Sub(now); {
	case t.IsZero() || d > 100*365*24*time.Hour:
		return "no expiry (held while the Node has these pod CIDRs)"
	case d <= 0:
		return "expired " + (-d).Round(time.Second).String() + " ago"
	default:
		return "expires in " + d.Round(time.Second).String()
	}
}

// ago is how long before now t was ("never" for the zero time).
func ago(now, t time.Time) string {
	if t.IsZero() {
		return "never"
	}
	return now.Sub(t).Round(time.Second).String() + " ago"
}

// rotateKey asks tulled for a new WireGuard key: written to its key file,
// used for new handshakes at once and published with the lease; existing
// sessions carry traffic until peers have the new key. The old key
// answers handshakes from peers that have not learned the new one for a
// grace of 2 minutes; --now (the old key leaked) ends that at once.
func rotateKey(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("rotate-key", flag.ContinueOnError)
	runDir := fs.String("run-dir", "/run/tulle", "tulled's run directory")
	now := fs.Bool("now", false, "the old key answers no handshake from now on (after a leak): peers that have not learned the new key wait until they do")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("rotate-key: unexpected argument %q", fs.Arg(0))
	}
	k, err := api.RotateKey(ctx, filepath.Join(*runDir, api.SocketName), *now)
	if err != nil {
		return err
	}
	fmt.Printf("new public key %s (fingerprint %s), published with the lease\n", k.PublicKey, k.Fingerprint)
	if k.OldKeyGrace > 0 {
		fmt.Printf("the old key answers handshakes for %s more (rotate-key --now ends that)\n", k.OldKeyGrace)
	} else {
		fmt.Println("the old key answers no handshake from now on")
	}
	return nil
}

func leases(args []string) error {
	fs := flag.NewFlagSet("leases", flag.ContinueOnError)
	dir := fs.String("lease-dir", "/var/lib/tulle/leases", "local lease store directory")
	conf := fs.String("net-conf", "/etc/tulle/net-conf.json", "net-conf.json (for the store's network)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	c, err := netconf.Load(*conf)
	if err != nil {
		return err
	}
	if _, err := os.Stat(*dir); err != nil {
		return fmt.Errorf("lease dir: %w", err)
	}
	store, err := local.New(local.Options{Dir: *dir, Net: c})
	if err != nil {
		return err
	}
	all, err := store.List()
	if err != nil {
		return err
	}
	return printLeases(all, time.Now())
}

func or(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// backendOf names a peer's backend for people: "vxlan (userspace)" when
// tulled's datapath speaks it.
func backendOf(p api.Peer) string {
	if p.Userspace {
		return p.Backend + " (userspace)"
	}
	return or(p.Backend, "none")
}
