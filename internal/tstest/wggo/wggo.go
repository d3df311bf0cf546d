// Package wggo runs the stock wireguard-go, the reference implementation
// tulle's WireGuard is measured and tested against: built at the version
// of golang.zx2c4.com/wireguard that a tulled binary was built with, run
// in a test node's namespace, configured with wg(8) as its users do. For
// the bench harness and the interop tests; it never touches tulle itself.
package wggo

import (
	"context"
	"debug/buildinfo"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"
)

// Module is the stock implementation's module.
const Module = "golang.zx2c4.com/wireguard"

// SocketDir holds wireguard-go's control sockets; it is shared by every
// network namespace, so devices need names unique on the host.
const SocketDir = "/var/run/wireguard"

// Build installs wireguard-go into dir (from the module proxy, or the
// module cache when it holds that version) at the version tulled was
// built with, and returns the binary's path.
func Build(ctx context.Context, dir, tulled string) (string, error) {
	bi, err := buildinfo.ReadFile(tulled)
	if err != nil {
		return "", fmt.Errorf("wireguard-go: build info of %s: %w", tulled, err)
	}
	version := ""
	for _, d := range bi.Deps {
		if d.Path == Module {
			version = d.Version
			if d.Replace != nil {
				version = d.Replace.Version
			}
		}
	}
	if version == "" {
		return "", fmt.Errorf("wireguard-go: %s has no %s in its build info", tulled, Module)
	}
	bin := filepath.Join(dir, "wireguard")
	if _, err := os.Stat(bin); err == nil {
		return bin, nil
	}
	cmd := exec.CommandContext(ctx, "go", "install", Module+"@"+version)
	cmd.Env = append(os.Environ(), "GOBIN="+dir, "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build wireguard-go %s: %w: %s", version, err, out)
	}
	return bin, nil
}

// Proc is one running wireguard-go.
type Proc struct {
	Name string
	cmd  *exec.Cmd
}

// Start runs bin in the foreground as device name, through wrap (which
// puts the command in a namespace, e.g. topo.Node.Command), and waits for
// its control socket.
func Start(wrap func(ctx context.Context, name string, args ...string) *exec.Cmd, bin, name string) (*Proc, error) {
	cmd := wrap(context.Background(), bin, "-f", name)
	cmd.Env = append(os.Environ(), "LOG_LEVEL=error")
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start wireguard-go %s: %w", name, err)
	}
	p := &Proc{Name: name, cmd: cmd}
	sock := filepath.Join(SocketDir, name+".sock")
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(sock); err == nil {
			return p, nil
		}
		if time.Now().After(deadline) {
			p.Stop()
			return nil, fmt.Errorf("wireguard-go %s: no control socket %s", name, sock)
		}
	}
}

// PID is the process id.
func (p *Proc) PID() int { return p.cmd.Process.Pid }

// Stop ends wireguard-go with SIGTERM (it removes its device and socket),
// kills it if it lingers, and removes a socket left behind.
func (p *Proc) Stop() error {
	p.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { p.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		p.cmd.Process.Kill()
		<-done
	}
	err := os.Remove(filepath.Join(SocketDir, p.Name+".sock"))
	if os.IsNotExist(err) {
		err = nil
	}
	return err
}
