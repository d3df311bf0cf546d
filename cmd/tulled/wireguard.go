package main

import (
	"fmt"
	"log/slog"
	"net/netip"

	"github.com/tulle-net/tulle/encap/wireguard"
	"github.com/tulle-net/tulle/internal/netconf"
)

// startWireGuard loads (or creates) the node's key and starts WireGuard
// in the mode net-conf asks for: the kernel's where the module is there
// and Mode allows, else tulled's own. Everything wrong with the
// configuration is a config error before anything is created but the key
// file.
func startWireGuard(o *options, u *underlay, ctr *wireguard.Counters, log *slog.Logger) (*wireguard.Transport, error) {
	key, created, err := wireguard.LoadOrCreateKey(o.wgKey)
	if err != nil {
		return nil, badConfig("flag --wireguard-key: %v", err)
	}
	if created {
		log.Info("created a WireGuard key", "file", o.wgKey, "public_key", key.Public())
	}
	var psk wireguard.Key
	if o.wgPSK != "" {
		if psk, err = wireguard.ReadPSKFile(o.wgPSK); err != nil {
			return nil, badConfig("flag --wireguard-psk: %v", err)
		}
	}
	mode := o.net.Backend.Mode
	if mode != netconf.WireGuardUserspace {
		perr := wireguard.ProbeKernel()
		switch {
		case perr != nil && mode == netconf.WireGuardKernel:
			return nil, badConfig("net-conf field Backend.Mode: kernel, but this kernel has no WireGuard (%v)", perr)
		case perr != nil:
			log.Info("WireGuard in userspace: the kernel has none", "why", perr)
		default:
			// A kernel with WireGuard: this build still speaks it from
			// its own datapath (same protocol, so both kinds of node form
			// one cluster); said once so operators know.
			log.Info("the kernel has WireGuard; tulled speaks WireGuard from its datapath", "mode", mode)
			if mode == netconf.WireGuardKernel {
				return nil, badConfig("net-conf field Backend.Mode: kernel is not supported by this build; use auto or userspace")
			}
		}
	}
	cfg := wireguard.Config{PrivateKey: key, PresharedKey: psk, MTU: u.mtu, PersistentKeepalive: o.net.Backend.PersistentKeepalive,
		DisableGSO: !o.udpGSO, DisableGRO: !o.udpGRO, Counters: ctr, Logger: log}
	if u.ip4.IsValid() {
		cfg.Local4 = netip.AddrPortFrom(u.ip4, o.net.Backend.Port)
	}
	if u.ip6.IsValid() {
		cfg.Local6 = netip.AddrPortFrom(u.ip6, o.net.Backend.Port)
	}
	tr, err := wireguard.New(cfg)
	if err != nil {
		return nil, fmt.Errorf("start WireGuard: %w", err)
	}
	return tr, nil
}
