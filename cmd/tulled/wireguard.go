package main

import (
	"fmt"
	"log/slog"
	"net/netip"
	"time"

	"github.com/tulle-net/tulle/encap/wireguard"
	"github.com/tulle-net/tulle/internal/netconf"
	"github.com/tulle-net/tulle/tunnel"
)

// wg is this node's WireGuard: tulled's own (transport) or a device it
// programs (dev), never both.
type wg struct {
	transport *wireguard.Transport
	dev       *wireguard.Device
}

// mode is how the status names where WireGuard runs.
func (w *wg) mode() string {
	if w.dev != nil {
		return "kernel"
	}
	return "userspace"
}

// PublicKey is this node's public key.
func (w *wg) PublicKey() wireguard.Key {
	if w.dev != nil {
		return w.dev.PublicKey()
	}
	return w.transport.PublicKey()
}

// Status is every peer's session state.
func (w *wg) Status() []wireguard.PeerStatus {
	if w.dev != nil {
		return w.dev.Status()
	}
	return w.transport.Status()
}

// SetPeers hands the plan's WireGuard peers to whichever runs.
func (w *wg) SetPeers(p []wireguard.PeerConfig) {
	if w.dev != nil {
		w.dev.SetPeers(p)
		return
	}
	w.transport.SetPeers(p)
}

// rotate makes a new key, writes it to the key file (atomically, 0600)
// and gives it to whichever runs; the caller republishes it. It returns
// how long the old key still answers handshakes: the userspace
// transport's grace, cut to nothing with now; a kernel device answers
// only its current key.
func (w *wg) rotate(keyFile string, now bool) (wireguard.Key, time.Duration, error) {
	k, err := wireguard.NewPrivateKey()
	if err != nil {
		return k, 0, err
	}
	if err := wireguard.WriteKeyFile(keyFile, k); err != nil {
		return k, 0, err
	}
	if w.dev != nil {
		w.dev.SetPrivateKey(k)
		return k, 0, nil
	}
	w.transport.SetPrivateKey(k)
	if now {
		w.transport.EndKeyGrace()
		return k, 0, nil
	}
	return k, wireguard.KeyGrace, nil
}

// Close releases what runs (the kernel device stays, with its sessions).
func (w *wg) Close() error {
	if w.dev != nil {
		return w.dev.Close()
	}
	return w.transport.Close()
}

// startWireGuard loads (or creates) the node's key and starts WireGuard
// in the mode net-conf asks for: a WireGuard device (the kernel's, or an
// existing one of --wireguard-device's name) where Mode allows and there
// is one, else tulled's own. Everything wrong with the configuration is a
// config error before anything is created.
func startWireGuard(o *options, u *underlay, ctr *wireguard.Counters, log *slog.Logger) (*wg, error) {
	mode := o.net.Backend.Mode
	device := false
	if mode != netconf.WireGuardUserspace {
		var why error
		if !wireguard.Exists(o.wgDevice) {
			why = wireguard.ProbeKernel()
		}
		switch {
		case why != nil && mode == netconf.WireGuardKernel:
			return nil, badConfig("net-conf field Backend.Mode: kernel, but this kernel has no WireGuard (%v) and there is no WireGuard device %s", why, o.wgDevice)
		case why != nil:
			log.Info("WireGuard in userspace: the kernel has none", "why", why)
		default:
			device = true
		}
	}
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
	w := &wg{}
	if device {
		w.dev, err = wireguard.NewDevice(wireguard.DeviceConfig{Name: o.wgDevice, PrivateKey: key, PresharedKey: psk, Port: o.net.Backend.Port,
			MTU: wireguard.InnerMTU(u.mtu, u.primaryIs6), PersistentKeepalive: o.net.Backend.PersistentKeepalive, Logger: log})
		if err != nil {
			return nil, err
		}
		log.Info("WireGuard through a device", "device", o.wgDevice)
		return w, nil
	}
	timers := wireguard.DefaultTimers
	timers.RekeyAfterTime = o.wgRekey
	cfg := wireguard.Config{PrivateKey: key, PresharedKey: psk, MTU: u.mtu, PersistentKeepalive: o.net.Backend.PersistentKeepalive, Timers: timers,
		DisableGSO: !o.udpGSO, DisableGRO: !o.udpGRO, Counters: ctr, Logger: log}
	if u.ip4.IsValid() {
		cfg.Local4 = netip.AddrPortFrom(u.ip4, o.net.Backend.Port)
	}
	if u.ip6.IsValid() {
		cfg.Local6 = netip.AddrPortFrom(u.ip6, o.net.Backend.Port)
	}
	if w.transport, err = wireguard.New(cfg); err != nil {
		return nil, fmt.Errorf("start WireGuard: %w", err)
	}
	return w, nil
}

// noTransport is the datapath's transport while a WireGuard device
// carries every peer: the TUN keeps the cluster routes and addresses, and
// nothing crosses it to a peer.
type noTransport struct{}

func (noTransport) Send([]tunnel.Frame) error       { return nil }
func (noTransport) Receivers() []tunnel.ReceiveFunc { return nil }
func (noTransport) Close() error                    { return nil }
func (noTransport) Serves(netip.AddrPort) bool      { return false }
func (noTransport) SetMTU(int)                      {}
