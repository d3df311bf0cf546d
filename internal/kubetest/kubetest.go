// Package kubetest runs a real kube-apiserver and etcd on loopback for
// integration tests (envtest style: no controller-manager, no kubelet; tests
// create Nodes and set pod CIDRs themselves).
//
// Binaries: etcd from PATH (Debian's etcd-server), kube-apiserver from
// $TULLE_KUBE_APISERVER or ~/.cache/tulle/kube-v1.34.4/kube-apiserver, which
// .ci/run builds from the tools/kube module.
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

// APIServerPath returns where the kube-apiserver binary is expected.
func APIServerPath() string {
	if p := os.Getenv("TULLE_KUBE_APISERVER"); p != "" {
		return p
	}
	home, _ := os.UserHomeDir()
	return filepath.Join(home, ".cache", "tulle", "kube-"+KubeVersion, "kube-apiserver")
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

// Cluster is a running etcd + kube-apiserver.
type Cluster struct {
	dir       string
	etcd      *exec.Cmd
	apiserver *exec.Cmd
	etcdURL   string
	port      int
}

// Start starts etcd and kube-apiserver and waits until the API is ready.
func Start(dir string) (*Cluster, error) {
	c := &Cluster{dir: dir}
	ports, err := freePorts(3)
	if err != nil {
		return nil, err
	}
	c.etcdURL = fmt.Sprintf("http://127.0.0.1:%d", ports[0])
	peer := fmt.Sprintf("http://127.0.0.1:%d", ports[1])
	c.port = ports[2]
	c.etcd = exec.Command("etcd", "--data-dir", filepath.Join(dir, "etcd"), "--name", "default",
		"--listen-client-urls", c.etcdURL, "--advertise-client-urls", c.etcdURL,
		"--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer, "--initial-cluster", "default="+peer,
		"--log-level", "error")
	if err := start(c.etcd, filepath.Join(dir, "etcd.log")); err != nil {
		return nil, err
	}
	if err := c.writeFiles(); err != nil {
		c.Stop()
		return nil, err
	}
	if err := c.StartAPIServer(); err != nil {
		c.Stop()
		return nil, err
	}
	return c, nil
}

func start(cmd *exec.Cmd, logPath string) error {
	log, err := os.OpenFile(logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		log.Close()
		return fmt.Errorf("start %s: %w", cmd.Path, err)
	}
	go func() { cmd.Wait(); log.Close() }()
	return nil
}

func (c *Cluster) writeFiles() error {
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
	c.apiserver = exec.Command(APIServerPath(),
		"--etcd-servers", c.etcdURL,
		"--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1", "--secure-port", strconv.Itoa(c.port),
		"--cert-dir", filepath.Join(d, "certs"),
		"--service-account-issuer", "https://kubernetes.default.svc", "--service-account-key-file", filepath.Join(d, "sa.pub"),
		"--service-account-signing-key-file", filepath.Join(d, "sa.key"),
		"--service-cluster-ip-range", "100.64.0.0/24",
		"--token-auth-file", filepath.Join(d, "tokens.csv"),
		"--authorization-mode", "RBAC",
		"--enable-priority-and-fairness=false",
		"--max-requests-inflight", "3000", "--max-mutating-requests-inflight", "1000",
	)
	if err := start(c.apiserver, filepath.Join(d, "apiserver.log")); err != nil {
		return err
	}
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
		if c.apiserver.ProcessState != nil {
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
		done := make(chan struct{})
		go func() {
			for c.apiserver.ProcessState == nil {
				time.Sleep(20 * time.Millisecond)
			}
			close(done)
		}()
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			c.apiserver.Process.Kill()
		}
	}
}

// Stop stops both.
func (c *Cluster) Stop() {
	c.StopAPIServer()
	if c.etcd != nil && c.etcd.Process != nil {
		c.etcd.Process.Kill()
	}
}

// URL is the API server's address.
func (c *Cluster) URL() string { return fmt.Sprintf("https://127.0.0.1:%d", c.port) }

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
	p := filepath.Join(c.dir, "kubeconfig-"+hex.EncodeToString([]byte(token))[:8])
	doc := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters: [{name: test, cluster: {server: %q, insecure-skip-tls-verify: true}}]
users: [{name: test, user: {token: %q}}]
contexts: [{name: test, context: {cluster: test, user: test}}]
current-context: test
`, c.URL(), token)
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
	go func() {
		for {
			in, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer in.Close()
				out, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", c.port))
				if err != nil {
					return
				}
				defer out.Close()
				go io.Copy(out, in)
				io.Copy(in, out)
			}()
		}
	}()
	return func() { ln.Close() }, nil
}
