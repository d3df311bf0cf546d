package bench

import (
	"context"
	"debug/buildinfo"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/tulle-net/tulle/internal/topo"
)

// wireguardGoModule is the stock implementation the wireguard-go path
// runs, at the version tulle itself depends on.
const wireguardGoModule = "golang.zx2c4.com/wireguard"

// wgGoPort and wgGoNet are the wireguard-go path's port and inner network.
const wgGoPort = 51830

// wireguardGo is the stock wireguard-go on every node, configured with wg
// as its users do: a full mesh, one /32 per node in 100.67.0.0/24, inner
// MTU = tulle-wireguard's (underlay − 60), so both carry the same packets.
type wireguardGo struct {
	procs []*exec.Cmd
	names []string
}

// buildWireguardGo installs the stock binary into dir (the module proxy,
// or the module cache when it already holds that version), at the version
// the tulled binary was built with.
func buildWireguardGo(ctx context.Context, dir, tulled string) (string, error) {
	version := ""
	if bi, err := buildinfo.ReadFile(tulled); err == nil {
		for _, d := range bi.Deps {
			if d.Path == wireguardGoModule {
				version = d.Version
				if d.Replace != nil {
					version = d.Replace.Version
				}
			}
		}
	}
	if version == "" {
		return "", fmt.Errorf("wireguard-go path: %s has no %s in its build info", tulled, wireguardGoModule)
	}
	cmd := exec.CommandContext(ctx, "go", "install", wireguardGoModule+"@"+version)
	cmd.Env = append(os.Environ(), "GOBIN="+dir, "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build wireguard-go %s: %w: %s", version, err, out)
	}
	return filepath.Join(dir, "wireguard"), nil
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
		name := fmt.Sprintf("twg%d%s", i, tp.Suffix)
		p := n.Command(context.Background(), bin, "-f", name)
		p.Env = append(os.Environ(), "LOG_LEVEL=error")
		if err := p.Start(); err != nil {
			return w, nil, fmt.Errorf("start wireguard-go on %s: %w", n.Name, err)
		}
		w.procs, w.names = append(w.procs, p), append(w.names, name)
		addrs = append(addrs, netip.AddrFrom4([4]byte{100, 67, 0, byte(i + 1)}))
	}
	for i, n := range tp.Nodes {
		if err := waitSocket(ctx, w.names[i]); err != nil {
			return w, nil, err
		}
		kf := filepath.Join(os.TempDir(), w.names[i]+".key")
		if err := os.WriteFile(kf, []byte(keys[i].priv+"\n"), 0o600); err != nil {
			return w, nil, err
		}
		args := []string{"set", w.names[i], "private-key", kf, "listen-port", fmt.Sprint(wgGoPort)}
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
			{"ip", "addr", "add", addrs[i].String() + "/24", "dev", w.names[i]},
			{"ip", "link", "set", w.names[i], "mtu", fmt.Sprint(mtu), "up"},
		} {
			if _, err := n.Run(c[0], c[1:]...); err != nil {
				return w, nil, err
			}
		}
	}
	return w, addrs, nil
}

func waitSocket(ctx context.Context, name string) error {
	sock := filepath.Join("/var/run/wireguard", name+".sock")
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(sock); err == nil {
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("wireguard-go %s: no control socket %s", name, sock)
		}
	}
}

// pids are the wireguard-go processes (their CPU and RSS are measured as
// tulled's are).
func (w *wireguardGo) pids() []int {
	var p []int
	for _, c := range w.procs {
		if c.Process != nil {
			p = append(p, c.Process.Pid)
		}
	}
	return p
}

// stop ends every wireguard-go (SIGTERM: it removes its device and
// socket) and removes a socket left behind.
func (w *wireguardGo) stop() error {
	for i, c := range w.procs {
		c.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { c.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			c.Process.Kill()
			<-done
		}
		os.Remove(filepath.Join("/var/run/wireguard", w.names[i]+".sock"))
	}
	return nil
}
