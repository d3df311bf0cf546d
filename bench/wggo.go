package bench

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/tulle-net/tulle/internal/tstest/topo"
	"github.com/tulle-net/tulle/internal/tstest/wggo"
)

// wgGoPort is the wireguard-go path's port.
const wgGoPort = 51830

// wireguardGo is the stock wireguard-go on every node, configured with wg
// as its users do: a full mesh, one /32 per node in 100.67.0.0/24, inner
// MTU = tulle-wireguard's (underlay − 60), so both carry the same packets.
type wireguardGo struct {
	procs []*wggo.Proc
}

// startWireguardGo runs and configures wireguard-go on every node.
func startWireguardGo(ctx context.Context, tp *topo.Topology, bin string, mtu int) (w *wireguardGo, addrs []netip.Addr, err error) {
	if _, err := exec.LookPath("wg"); err != nil {
		return nil, nil, errors.New("wireguard-go path: wg (Debian's wireguard-tools) is not installed")
	}
	w = &wireguardGo{}
	defer func() {
		if err != nil {
			w.stop()
		}
	}()
	type nodeKey struct{ priv, pub string }
	keys := make([]nodeKey, len(tp.Nodes))
	for i, n := range tp.Nodes {
		priv, err := n.Run("wg", "genkey")
		if err != nil {
			return w, nil, err
		}
		cmd := n.Command(ctx, "wg", "pubkey")
		cmd.Stdin = strings.NewReader(priv)
		pub, err := cmd.Output()
		if err != nil {
			return w, nil, fmt.Errorf("wg pubkey: %w", err)
		}
		keys[i] = nodeKey{strings.TrimSpace(priv), strings.TrimSpace(string(pub))}
		// The control socket lives in /var/run/wireguard, shared by every
		// namespace: each node's device gets a name of its own.
		p, err := wggo.Start(n.Command, bin, fmt.Sprintf("twg%d%s", i, tp.Suffix))
		if err != nil {
			return w, nil, err
		}
		w.procs = append(w.procs, p)
		addrs = append(addrs, netip.AddrFrom4([4]byte{100, 67, 0, byte(i + 1)}))
	}
	for i, n := range tp.Nodes {
		name := w.procs[i].Name
		kf := filepath.Join(os.TempDir(), name+".key")
		if err := os.WriteFile(kf, []byte(keys[i].priv+"\n"), 0o600); err != nil {
			return w, nil, err
		}
		args := []string{"set", name, "private-key", kf, "listen-port", fmt.Sprint(wgGoPort)}
		for j, p := range tp.Nodes {
			if j != i {
				args = append(args, "peer", keys[j].pub, "endpoint", fmt.Sprintf("%s:%d", p.IP4, wgGoPort), "allowed-ips", addrs[j].String()+"/32")
			}
		}
		_, err := n.Run("wg", args...)
		os.Remove(kf)
		if err != nil {
			return w, nil, err
		}
		for _, c := range [][]string{
			{"ip", "addr", "add", addrs[i].String() + "/24", "dev", name},
			{"ip", "link", "set", name, "mtu", fmt.Sprint(mtu), "up"},
		} {
			if _, err := n.Run(c[0], c[1:]...); err != nil {
				return w, nil, err
			}
		}
	}
	return w, addrs, nil
}

// pids are the wireguard-go processes (their CPU and RSS are measured as
// tulled's are).
func (w *wireguardGo) pids() []int {
	var p []int
	for _, c := range w.procs {
		p = append(p, c.PID())
	}
	return p
}

// stop ends every wireguard-go.
func (w *wireguardGo) stop() error {
	var errs []error
	for _, p := range w.procs {
		errs = append(errs, p.Stop())
	}
	return errors.Join(errs...)
}
