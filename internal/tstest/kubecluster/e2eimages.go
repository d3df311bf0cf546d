package kubecluster

import (
	"fmt"
	"github.com/tulle-net/tulle/internal/rootfs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// E2EVersion is the Kubernetes release whose e2e tests, agnhost and
// images tools/setup builds from tools/e2e.
const E2EVersion = "v1.34.4"

// E2EDir is where tools/setup puts the conformance tooling: e2e.test,
// ginkgo, agnhost, coredns, and agnhost's porter certificate.
func E2EDir() string {
	home, _ := os.UserHomeDir()
	return filepath.Join(home, ".cache", "tulle", "e2e-"+E2EVersion)
}

// The images the upstream networking tests run (test/utils/image's
// manifest, by their upstream names so no KUBE_TEST_REPO_LIST is needed),
// and the cluster DNS. Built here from E2EDir and this machine's Debian
// packages, never pulled.
const (
	AgnhostImage   = "registry.k8s.io/e2e-test-images/agnhost:2.56"
	DNSUtilsImage  = "registry.k8s.io/e2e-test-images/jessie-dnsutils:1.7"
	BusyBoxImage   = "registry.k8s.io/e2e-test-images/busybox:1.37.0-1"
	UpstreamPause  = "registry.k8s.io/pause:3.10.1"
	CoreDNSImage   = "tulle.test/coredns:1"
	agnhostVersion = "2.56"
)

// agnhostPrograms are what the tests exec in agnhost (and
// jessie-dnsutils) containers besides agnhost itself, as upstream's
// image installs them: a real shell (a busybox sh prefers its own
// applets, and busybox's nc is not the netcat the tests speak to),
// netcat-openbsd, curl, dig/nslookup/host, ss and ip, iperf, getent.
var agnhostPrograms = []string{
	"/usr/bin/bash", "/usr/bin/nc.openbsd", "/usr/bin/curl", "/usr/bin/dig", "/usr/bin/nslookup", "/usr/bin/host",
	"/usr/bin/ss", "/usr/bin/ip", "/usr/bin/iperf", "/usr/bin/getent",
}

// e2eHostPackages are the Debian packages the e2e images are assembled
// from, by a program each has (tools/setup installs them).
var e2eHostPackages = map[string]string{
	"/usr/bin/busybox": "busybox-static", "/usr/bin/nc.openbsd": "netcat-openbsd", "/usr/bin/curl": "curl",
	"/usr/bin/dig": "bind9-dnsutils", "/usr/bin/ss": "iproute2", "/usr/bin/iperf": "iperf", "/usr/bin/bash": "bash",
}

// MissingE2E says what this machine lacks to run the upstream e2e tests
// against a cluster, or "".
func MissingE2E() string {
	for _, f := range []string{"e2e.test", "ginkgo", "agnhost", "coredns", "localhost.crt", "localhost.key"} {
		if _, err := os.Stat(filepath.Join(E2EDir(), f)); err != nil {
			return filepath.Join(E2EDir(), f) + " (tools/setup conformance builds it)"
		}
	}
	for prog, pkg := range e2eHostPackages {
		if _, err := os.Stat(prog); err != nil {
			return fmt.Sprintf("%s (apt-get install %s)", prog, pkg)
		}
	}
	if _, err := exec.LookPath("ldd"); err != nil {
		return "ldd (apt-get install libc-bin)"
	}
	return ""
}

// buildE2EImages writes the images the e2e tests use as docker-archives
// into dir: agnhost (also tagged jessie-dnsutils, whose dig it has),
// busybox, and CoreDNS. The pause image is the harness's own (tagged with
// the upstream name too).
func buildE2EImages(dir string) ([]string, error) {
	e2e := E2EDir()
	var archives []string

	// agnhost, laid out as upstream's Dockerfile lays it out.
	a := rootfs.New()
	a.Copy(filepath.Join(e2e, "agnhost"), "agnhost", 0o755)
	a.Link("agnhost-2", "agnhost")
	a.Copy(filepath.Join(e2e, "localhost.crt"), "localhost.crt", 0o644)
	a.Copy(filepath.Join(e2e, "localhost.key"), "localhost.key", 0o644)
	a.Dir("uploads", 0o755)
	a.File("etc/passwd", []byte("root:x:0:0:root:/root:/bin/sh\nuser-defined-in-image:x:1000:1000::/home/user-defined-in-image:/bin/sh\n"), 0o644)
	a.File("etc/group", []byte("root:x:0:\nuser-defined-in-image:x:1000:\ngroup-defined-in-image:x:50000:user-defined-in-image\n"), 0o644)
	a.Dir("home/user-defined-in-image", 0o755)
	for _, p := range agnhostPrograms {
		if err := a.Program(p); err != nil {
			return nil, err
		}
	}
	a.Link("bin/sh", "bash")
	a.Link("usr/bin/nc", "nc.openbsd")
	a.Link("usr/local/bin/iperf", "/usr/bin/iperf")
	if err := busyboxApplets(a); err != nil {
		return nil, err
	}
	p, err := writeImage(dir, "agnhost", a, imageConfig{
		Refs: []string{AgnhostImage, DNSUtilsImage}, Entrypoint: []string{"/agnhost"}, Cmd: []string{"pause"},
		Env: []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
	})
	if err != nil {
		return nil, err
	}
	archives = append(archives, p)

	// busybox: the static busybox and its applets, sh included.
	b := rootfs.New()
	b.File("etc/passwd", []byte("root:x:0:0:root:/root:/bin/sh\n"), 0o644)
	b.File("etc/group", []byte("root:x:0:\n"), 0o644)
	if err := busyboxApplets(b); err != nil {
		return nil, err
	}
	if p, err = writeImage(dir, "busybox", b, imageConfig{
		Refs: []string{BusyBoxImage}, Cmd: []string{"sh"},
		Env: []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"},
	}); err != nil {
		return nil, err
	}
	archives = append(archives, p)

	// CoreDNS: one static binary.
	c := rootfs.New()
	c.Copy(filepath.Join(e2e, "coredns"), "coredns", 0o755)
	if p, err = writeImage(dir, "coredns", c, imageConfig{Refs: []string{CoreDNSImage}, Entrypoint: []string{"/coredns"}}); err != nil {
		return nil, err
	}
	return append(archives, p), nil
}

// busyboxApplets puts busybox (Debian's static build, or the dynamic one
// with its libraries) in the image with a link for each applet the image
// has no program for.
func busyboxApplets(r *rootfs.Layer) error {
	if err := r.Program("/usr/bin/busybox"); err != nil {
		return err
	}
	out, err := exec.Command("/usr/bin/busybox", "--list-full").Output()
	if err != nil {
		return fmt.Errorf("busybox --list-full: %w", err)
	}
	for _, l := range strings.Fields(string(out)) {
		if !r.Has(l) {
			r.Link(l, "/usr/bin/busybox")
		}
	}
	return nil
}

func writeImage(dir, name string, r *rootfs.Layer, img imageConfig) (string, error) {
	layer := filepath.Join(dir, name+"-layer.tar")
	if err := r.Write(layer); err != nil {
		return "", fmt.Errorf("image %s: %w", name, err)
	}
	defer os.Remove(layer)
	return img.write(dir, layer)
}
