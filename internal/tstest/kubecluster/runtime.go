package kubecluster

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
)

// Runtime is the container runtime of the nodes and the CNI plugins they
// come with.
type Runtime struct {
	// Name says which, in logs.
	Name string
	// Dir holds containerd, containerd-shim-runc-v2, ctr and the CNI
	// plugins loopback and portmap; "" is Debian's (containerd 1.6 on PATH,
	// the plugins in /usr/lib/cni).
	Dir string
	// ConfigVersion is containerd's config format: 2 (1.x) or 3 (2.x).
	ConfigVersion int
}

// Containerd16 is Debian 12's containerd 1.6 and runc, with Debian's CNI
// plugins 1.1: a runtime whose libcni speaks CNI up to 1.0.0.
var Containerd16 = Runtime{Name: "containerd 1.6 (Debian)", ConfigVersion: 2}

// Containerd2Version is the containerd 2 tools/setup builds from the Go
// module proxy (tools/containerd), with the CNI plugins of tulle's own
// module version: a runtime that speaks CNI 1.1.0 and calls STATUS.
const Containerd2Version = "v2.4.2"

// Containerd2 is containerd 2 with current CNI plugins.
func Containerd2() Runtime {
	home, _ := os.UserHomeDir()
	return Runtime{Name: "containerd " + Containerd2Version, Dir: filepath.Join(home, ".cache", "tulle", "containerd-"+Containerd2Version), ConfigVersion: 3}
}

// bin is the path of the runtime's command name.
func (r Runtime) bin(name string) string {
	if r.Dir == "" {
		return name
	}
	return filepath.Join(r.Dir, name)
}

// cniPlugin is where the runtime's CNI plugin name is.
func (r Runtime) cniPlugin(name string) string {
	if r.Dir == "" {
		return filepath.Join(hostCNIDir, name)
	}
	return filepath.Join(r.Dir, name)
}

// missing says what of the runtime this machine lacks, or "".
func (r Runtime) missing() string {
	if _, err := exec.LookPath("runc"); err != nil {
		return "runc (apt-get install runc)"
	}
	where := "(tools/setup builds it)"
	if r.Dir == "" {
		where = "(apt-get install containerd)"
	}
	for _, b := range []string{"containerd", "containerd-shim-runc-v2", "ctr"} {
		if _, err := exec.LookPath(r.bin(b)); err != nil {
			return r.bin(b) + " " + where
		}
	}
	if r.Dir == "" {
		where = "(apt-get install containernetworking-plugins)"
	}
	for _, p := range []string{"loopback", "portmap"} {
		if _, err := os.Stat(r.cniPlugin(p)); err != nil {
			return "the CNI plugin " + r.cniPlugin(p) + " " + where
		}
	}
	return ""
}

// config is containerd's configuration for node n.
func (r Runtime) config(n *Node) string {
	d := n.Dir
	root, state, opt, runc := filepath.Join(d, "containerd/root"), filepath.Join(d, "containerd/state"), filepath.Join(d, "containerd/opt"), filepath.Join(d, "runc")
	if r.ConfigVersion == 3 {
		return fmt.Sprintf(`version = 3
root = %q
state = %q
[grpc]
  address = %q
[plugins.'io.containerd.internal.v1.opt']
  path = %q
[plugins.'io.containerd.cri.v1.images']
  snapshotter = 'overlayfs'
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = %q
[plugins.'io.containerd.cri.v1.runtime']
  # root here lacks CAP_SYS_RESOURCE: lowering a score is all runc may do.
  restrict_oom_score_adj = true
  disable_apparmor = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = 'runc'
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = 'io.containerd.runc.v2'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        Root = %q
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ['/opt/cni/bin']
    conf_dir = '/etc/cni/net.d'
`, root, state, n.sock(), opt, PauseImage, runc)
	}
	return fmt.Sprintf(`version = 2
root = %q
state = %q
[grpc]
  address = %q
[plugins."io.containerd.internal.v1.opt"]
  path = %q
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %q
  # root here lacks CAP_SYS_RESOURCE: lowering a score is all runc may do.
  restrict_oom_score_adj = true
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = %q
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
`, root, state, n.sock(), opt, PauseImage, runc)
}
