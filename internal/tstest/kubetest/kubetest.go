// Package kubetest runs a real kube-apiserver and etcd for integration tests
// (envtest style: no controller-manager, no kubelet; tests create Nodes and
// set pod CIDRs themselves). By default both listen on the host's loopback;
// with Options.NetNS they run inside a network namespace, on an address
// there, and the host reaches the API server through a relay on loopback
// (internal/kubecluster builds a whole cluster that way).
//
// Binaries: etcd from PATH (Debian's etcd-server), the Kubernetes ones from
// $TULLE_KUBE_BIN (a directory) or ~/.cache/tulle/kube-v1.34.4/, which
// tools/setup builds from the tools/kube module; $TULLE_KUBE_APISERVER
// still names the API server alone.
package kubetest

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// KubeVersion is the kube-apiserver version the harness expects.
const KubeVersion = "v1.34.4"

// BinDir is the directory of the Kubernetes binaries tools/setup builds.
func BinDir() string {
	if p := os.Getenv("TULLE_KUBE_BIN"); p != "" {
		return p
	}
	home, _ := os.UserHomeDir()
	return filepath.Join(home, ".cache", "tulle", "kube-"+KubeVersion)
}

// Bin is the path of the Kubernetes binary name (kubelet, kubectl, …).
func Bin(name string) string { return filepath.Join(BinDir(), name) }

// APIServerPath returns where the kube-apiserver binary is expected.
func APIServerPath() string {
	if p := os.Getenv("TULLE_KUBE_APISERVER"); p != "" {
		return p
	}
	return Bin("kube-apiserver")
}

// Missing says which binary is missing, or "".
func Missing() string {
	if _, err := exec.LookPath("etcd"); err != nil {
		return "etcd (apt-get install etcd-server)"
	}
	if _, err := os.Stat(APIServerPath()); err != nil {
		return "kube-apiserver at " + APIServerPath() + " (build it: see .ci/run)"
	}
	return ""
}

// Users are the static tokens the API server accepts.
const (
	AdminToken  = "tulle-test-admin"
	TulledToken = "tulle-test-tulled" // user "tulled", no groups: RBAC decides
	TulledUser  = "tulled"
)

// Options place the control plane. The zero value is the host's loopback.
type Options struct {
	// NetNS runs etcd and kube-apiserver in this named network namespace
	// (etcd on its loopback, the API server on Address:6443); the host
	// reaches the API server through a relay on its own loopback.
	NetNS string
	// Address is the API server's address in NetNS, also advertised as
	// the kubernetes Service's endpoint.
	Address netip.Addr
	// DoIn runs fn inside a named network namespace (topo.DoIn); needed
	// with NetNS.
	DoIn func(ns string, fn func() error) error
	// ServiceCIDR is the Service network (default 100.64.0.0/24).
	ServiceCIDR string
	// Args are extra kube-apiserver flags.
	Args []string
}

// Cluster is a running etcd + kube-apiserver.
type Cluster struct {
	dir       string
	opt       Options
	etcd      *exec.Cmd
	apiserver *exec.Cmd
	apiDone   <-chan struct{} // closed once the API server has exited
	etcdURL   string
	port      int // the host's: the API server's own, or the relay's
	relay     net.Listener
	// CA signs the API server's serving certificate (CAFile), so in-cluster
	// clients can verify it.
	CA *CA
}

// Start starts etcd and kube-apiserver on the host's loopback and waits
// until the API is ready.
func Start(dir string) (*Cluster, error) { return StartWith(dir, Options{}) }

// StartWith starts etcd and kube-apiserver where opt says and waits until
// the API is ready.
func StartWith(dir string, opt Options) (_ *Cluster, err error) {
	if opt.ServiceCIDR == "" {
		opt.ServiceCIDR = "100.64.0.0/24"
	}
	if opt.NetNS != "" && (opt.DoIn == nil || !opt.Address.IsValid()) {
		return nil, errors.New("kubetest: NetNS needs DoIn and Address")
	}
	c := &Cluster{dir: dir, opt: opt}
	defer func() {
		if err != nil {
			c.Stop()
		}
	}()
	ports, err := freePorts(3)
	if err != nil {
		return nil, err
	}
	c.etcdURL = fmt.Sprintf("http://127.0.0.1:%d", ports[0])
	peer := fmt.Sprintf("http://127.0.0.1:%d", ports[1])
	c.port = ports[2]
	c.etcd = c.command("etcd", "--data-dir", filepath.Join(dir, "etcd"), "--name", "default",
		"--listen-client-urls", c.etcdURL, "--advertise-client-urls", c.etcdURL,
		"--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer, "--initial-cluster", "default="+peer,
		"--log-level", "error")
	if err := Run(c.etcd, filepath.Join(dir, "etcd.log")); err != nil {
		return nil, err
	}
	if err := c.writeFiles(); err != nil {
		return nil, err
	}
	if opt.NetNS != "" {
		if err := c.startRelay(); err != nil {
			return nil, err
		}
	}
	if err := c.StartAPIServer(); err != nil {
		return nil, err
	}
	return c, nil
}

// command is name with args, inside the namespace when there is one.
func (c *Cluster) command(name string, args ...string) *exec.Cmd {
	if c.opt.NetNS == "" {
		return exec.Command(name, args...)
	}
	return exec.Command("nsenter", append([]string{"--net=/run/netns/" + c.opt.NetNS, "--", name}, args...)...)
}

// Run starts cmd with its output appended to logPath, killed when this
// process dies; a goroutine reaps it.
func Run(cmd *exec.Cmd, logPath string) error {
	_, err := start(cmd, logPath)
	return err
}

// StartProcess is Run, and returns a channel closed once the process has exited
// and been reaped (cmd's state is the reaping goroutine's until then).
func StartProcess(cmd *exec.Cmd, logPath string) (<-chan struct{}, error) {
	return start(cmd, logPath)
}

// start is Run, and says when the process has exited: the reaping
// goroutine owns cmd's state, so nothing else may read it.
func start(cmd *exec.Cmd, logPath string) (<-chan struct{}, error) {
	log, err := os.OpenFile(logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return nil, err
	}
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		log.Close()
		return nil, fmt.Errorf("start %s: %w", cmd.Path, err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); log.Close(); close(done) }()
	return done, nil
}

// exited reports whether the process start reaped has exited.
func exited(done <-chan struct{}) bool {
	select {
	case <-done:
		return true
	default:
		return false
	}
}

func (c *Cluster) writeFiles() error {
	ips := []net.IP{net.IPv4(127, 0, 0, 1)}
	if c.opt.Address.IsValid() {
		ips = append(ips, c.opt.Address.AsSlice())
	}
	if svc, err := netip.ParsePrefix(c.opt.ServiceCIDR); err == nil {
		ips = append(ips, svc.Addr().Next().AsSlice()) // the kubernetes Service
	}
	ca, err := NewCA(c.dir)
	if err != nil {
		return err
	}
	c.CA = ca
	if err := ca.Issue("apiserver", ips, []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"}); err != nil {
		return err
	}
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	pub, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(c.dir, "sa.key"), pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)}), 0o600); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(c.dir, "sa.pub"), pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub}), 0o644); err != nil {
		return err
	}
	tokens := fmt.Sprintf("%s,admin,admin,system:masters\n%s,%s,%s\n", AdminToken, TulledToken, TulledUser, TulledUser)
	return os.WriteFile(filepath.Join(c.dir, "tokens.csv"), []byte(tokens), 0o600)
}

// StartAPIServer (re)starts kube-apiserver on the same port and etcd.
func (c *Cluster) StartAPIServer() error {
	d := c.dir
	addr, port := "127.0.0.1", c.port
	if c.opt.NetNS != "" {
		addr, port = c.opt.Address.String(), APIPort
	}
	c.apiserver = c.command(APIServerPath(), append([]string{
		"--etcd-servers", c.etcdURL,
		"--bind-address", addr, "--advertise-address", addr, "--secure-port", strconv.Itoa(port),
		"--tls-cert-file", c.CA.CertFile("apiserver"), "--tls-private-key-file", c.CA.KeyFile("apiserver"),
		"--service-account-issuer", "https://kubernetes.default.svc", "--service-account-key-file", filepath.Join(d, "sa.pub"),
		"--service-account-signing-key-file", filepath.Join(d, "sa.key"),
		"--service-cluster-ip-range", c.opt.ServiceCIDR,
		"--token-auth-file", filepath.Join(d, "tokens.csv"),
		"--authorization-mode", "RBAC",
		"--enable-priority-and-fairness=false",
		"--max-requests-inflight", "3000", "--max-mutating-requests-inflight", "1000",
	}, c.opt.Args...)...)
	done, err := start(c.apiserver, filepath.Join(d, "apiserver.log"))
	if err != nil {
		return err
	}
	c.apiDone = done
	deadline := time.Now().Add(90 * time.Second)
	hc := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	for time.Now().Before(deadline) {
		req, _ := http.NewRequest("GET", c.URL()+"/readyz", nil)
		req.Header.Set("Authorization", "Bearer "+AdminToken)
		if resp, err := hc.Do(req); err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return nil
			}
		}
		if exited(c.apiDone) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	b, _ := os.ReadFile(filepath.Join(d, "apiserver.log"))
	if len(b) > 3000 {
		b = b[len(b)-3000:]
	}
	return fmt.Errorf("kube-apiserver not ready after 90s:\n%s", b)
}

// StopAPIServer kills kube-apiserver, as a crash would (etcd keeps the
// data).
func (c *Cluster) StopAPIServer() {
	if c.apiserver != nil && c.apiserver.Process != nil {
		c.apiserver.Process.Kill()
		select {
		case <-c.apiDone:
		case <-time.After(20 * time.Second):
			c.apiserver.Process.Kill()
		}
	}
}

// Stop stops both (and the relay).
func (c *Cluster) Stop() {
	c.StopAPIServer()
	if c.etcd != nil && c.etcd.Process != nil {
		c.etcd.Process.Kill()
	}
	if c.relay != nil {
		c.relay.Close()
	}
}

// startRelay listens on the host's loopback and relays each connection to
// the API server inside the namespace (a socket keeps the namespace it was
// made in).
func (c *Cluster) startRelay() error {
	ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", c.port))
	if err != nil {
		return fmt.Errorf("relay to the API server: %w", err)
	}
	c.relay = ln
	target := net.JoinHostPort(c.opt.Address.String(), strconv.Itoa(APIPort))
	go relay(ln, func() (out net.Conn, err error) {
		err = c.opt.DoIn(c.opt.NetNS, func() (err error) {
			out, err = net.DialTimeout("tcp", target, 5*time.Second)
			return err
		})
		return out, err
	})
	return nil
}

// relay accepts connections on ln until it closes and splices each to
// a connection dial makes.
func relay(ln net.Listener, dial func() (net.Conn, error)) {
	for {
		in, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer in.Close()
			out, err := dial()
			if err != nil {
				return
			}
			defer out.Close()
			splice(in, out)
		}()
	}
}

// splice copies both ways until either side ends.
func splice(a, b net.Conn) {
	done := make(chan struct{}, 2)
	go func() { io.Copy(a, b); done <- struct{}{} }()
	go func() { io.Copy(b, a); done <- struct{}{} }()
	<-done
}

// APIPort is the API server's port inside Options.NetNS.
const APIPort = 6443

// URL is the API server's address from the host.
func (c *Cluster) URL() string { return fmt.Sprintf("https://127.0.0.1:%d", c.port) }

// InternalURL is the API server's address from inside the network (the
// namespace's Address), or URL without a namespace.
func (c *Cluster) InternalURL() string {
	if c.opt.NetNS == "" {
		return c.URL()
	}
	return "https://" + net.JoinHostPort(c.opt.Address.String(), strconv.Itoa(APIPort))
}

// Dir is the directory holding the cluster's files and logs.
func (c *Cluster) Dir() string { return c.dir }

// Config returns a client config authenticating with token.
func (c *Cluster) Config(token string) *rest.Config {
	return &rest.Config{Host: c.URL(), BearerToken: token, TLSClientConfig: rest.TLSClientConfig{Insecure: true}, QPS: 500, Burst: 1000}
}

// Client returns a clientset for token.
func (c *Cluster) Client(token string) (kubernetes.Interface, error) {
	return kubernetes.NewForConfig(c.Config(token))
}

// Kubeconfig writes a kubeconfig file for token and returns its path.
func (c *Cluster) Kubeconfig(token string) (string, error) {
	return c.writeKubeconfig("kubeconfig-"+hex.EncodeToString([]byte(token))[:8], c.URL(), token)
}

// InternalKubeconfig writes a kubeconfig for token that reaches the API
// server at InternalURL, verifying it with the CA (for components in the
// cluster's namespaces).
func (c *Cluster) InternalKubeconfig(token string) (string, error) {
	return c.writeKubeconfig("kubeconfig-internal-"+hex.EncodeToString([]byte(token))[:8], c.InternalURL(), token)
}

func (c *Cluster) writeKubeconfig(name, server, token string) (string, error) {
	p := filepath.Join(c.dir, name)
	doc := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters: [{name: test, cluster: {server: %q, certificate-authority: %q}}]
users: [{name: test, user: {token: %q}}]
contexts: [{name: test, context: {cluster: test, user: test}}]
current-context: test
`, server, c.CA.CAFile(), token)
	return p, os.WriteFile(p, []byte(doc), 0o600)
}

func freePorts(n int) ([]int, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	if len(ports) != n {
		return nil, errors.New("no free ports")
	}
	return ports, nil
}

// ForwardInto makes the API server reachable at the same loopback address
// from inside network namespace ns: a listener opened there relays each
// connection to the host's loopback (a socket keeps the namespace it was
// created in). Call stop to close it.
func (c *Cluster) ForwardInto(ns string, doIn func(string, func() error) error) (stop func(), err error) {
	var ln net.Listener
	if err := doIn(ns, func() (err error) {
		ln, err = net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", c.port))
		return err
	}); err != nil {
		return nil, fmt.Errorf("forward into %s: %w", ns, err)
	}
	go relay(ln, func() (net.Conn, error) { return net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", c.port)) })
	return func() { ln.Close() }, nil
}
