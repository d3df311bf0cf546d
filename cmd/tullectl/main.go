// Command tullectl inspects and exercises tulle.
//
//	tullectl status [--run-dir DIR]      a running tulled's lease, peers and counters
//	tullectl rotate-key [--run-dir DIR]  a new WireGuard key for the node, published at once
//	tullectl leases [--lease-dir DIR]    the leases in a local store
//	tullectl demo [--tulled PATH]        a three-node overlay in namespaces, end to end
//	tullectl bench [--out DIR] [flags]   iperf3 over every path side by side, reports in DIR
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/tulle-net/tulle/internal/api"
	"github.com/tulle-net/tulle/internal/netconf"
	"github.com/tulle-net/tulle/lease/local"
)

func usage() {
	fmt.Fprintln(os.Stderr, `usage: tullectl <command> [flags]

commands:
  status   show a running tulled's lease, peers and counters
  rotate-key  give a running tulled a new WireGuard key (sessions carry on)
  leases   list the leases in a local lease store
  demo     run a three-node tulle overlay in network namespaces (root)
  bench    measure raw veth, kernel VXLAN and tulle side by side with iperf3 (root)`)
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
	if err != nil {
		fmt.Fprintf(os.Stderr, "tullectl: %v\n", err)
		os.Exit(1)
	}
}

func status(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	runDir := fs.String("run-dir", "/run/tulle", "tulled's run directory")
	if err := fs.Parse(args); err != nil {
		return err
	}
	s, err := api.Get(ctx, filepath.Join(*runDir, api.SocketName))
	if err != nil {
		return err
	}
	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintf(w, "node\t%s (pid %d, up %s)\n", s.Node, s.PID, s.Uptime)
	ready := "yes"
	if s.NotReady != "" {
		ready = "no: " + s.NotReady
	}
	fmt.Fprintf(w, "ready\t%s\n", ready)
	fmt.Fprintf(w, "subnets\t%v\n", s.Lease.Subnets())
	fmt.Fprintf(w, "mtu\t%d\n", s.MTU)
	if wg := s.WireGuard; wg != nil {
		fmt.Fprintf(w, "wireguard\t%s, port %d, key %s\n", wg.Mode, wg.Port, wg.PublicKey)
	}
	fmt.Fprintf(w, "peers\t%d\n", len(s.Peers))
	for _, p := range s.Peers {
		fmt.Fprintf(w, "  %s\t%s\t%s\t%v\t%s\n", p.Name, backendOf(p), p.Endpoint, p.Subnets, p.Reason)
		if wg := p.WireGuard; wg != nil {
			hs := "never"
			if !wg.LastHandshake.IsZero() {
				hs = time.Since(wg.LastHandshake).Round(time.Second).String() + " ago"
			}
			fmt.Fprintf(w, "  \tkey %s…\tat %s\thandshake %s\trx %d B, tx %d B\n", wg.Fingerprint, wg.Endpoint, hs, wg.RxBytes, wg.TxBytes)
		}
	}
	names := make([]string, 0, len(s.Counters))
	for k := range s.Counters {
		names = append(names, k)
	}
	slices.Sort(names)
	fmt.Fprintln(w, "counters")
	for _, k := range names {
		fmt.Fprintf(w, "  %s\t%d\n", k, s.Counters[k])
	}
	return w.Flush()
}

// rotateKey asks tulled for a new WireGuard key: written to its key file,
// used for new handshakes at once and published with the lease; existing
// sessions carry traffic until peers have the new key.
func rotateKey(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("rotate-key", flag.ContinueOnError)
	runDir := fs.String("run-dir", "/run/tulle", "tulled's run directory")
	if err := fs.Parse(args); err != nil {
		return err
	}
	k, err := api.RotateKey(ctx, filepath.Join(*runDir, api.SocketName))
	if err != nil {
		return err
	}
	fmt.Printf("new public key %s (fingerprint %s), published with the lease\n", k.PublicKey, k.Fingerprint)
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
