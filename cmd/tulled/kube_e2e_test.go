package main

import (
	"context"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tulle-net/tulle/internal/tstest/cluster"
	"github.com/tulle-net/tulle/internal/tstest/kubetest"
	"github.com/tulle-net/tulle/internal/tstest/testenv"
	"github.com/tulle-net/tulle/internal/tstest/topo"
)

// TestKubeStore runs tulled on two namespace nodes with --lease-store kube
// (podcidr mode) against a real API server, then kills the API server:
// traffic keeps flowing with the last known peers and tulled reports
// not-ready until the API is back.
func TestKubeStore(t *testing.T) {
	requireNetns(t)
	testenv.Require(t, kubetest.Missing())
	kc, err := kubetest.Start(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(kc.Stop)
	admin, _ := kc.Client(kubetest.AdminToken)
	kcfg, err := kc.Kubeconfig(kubetest.AdminToken)
	if err != nil {
		t.Fatal(err)
	}
	c, err := cluster.Build(topo.Options{Nodes: 2, Prefix: "tullekube"}, cluster.Options{Tulled: tulled(t), Dir: t.TempDir(), Args: []string{"--lease-store", "kube", "--kubeconfig", kcfg, "--http-addr", "127.0.0.1:9107"}})
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range c.Topo.Nodes {
		stop, err := kc.ForwardInto(n.NS, topo.DoIn)
		if err != nil {
			c.Close()
			t.Fatal(err)
		}
		t.Cleanup(stop) // runs after the cluster's cleanup, which needs the API
	}
	t.Cleanup(func() { c.CloseFor(t) })
	// n1 has no pod CIDR yet: its tulled waits for one, and says so.
	for i, n := range c.Topo.Nodes {
		node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n.Name}}
		if i == 1 {
			node.Spec.PodCIDRs = []string{"100.96.12.0/24", "fd00:96:0:12::/64"}
		}
		if _, err := admin.CoreV1().Nodes().Create(context.Background(), node, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	a, b := c.Nodes[0], c.Nodes[1]
	if err := a.Start(); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		code, body := httpGetOK(a, "/readyz")
		if code == 503 && strings.Contains(body, "no lease held yet") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("before its lease: /readyz %d %q, want 503 starting", code, body)
		}
	}
	if code, _ := httpGet(t, a, "/healthz"); code != 200 {
		t.Errorf("/healthz before the lease: %d", code)
	}
	n1, err := admin.CoreV1().Nodes().Get(ctx, "n1", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	n1.Spec.PodCIDRs = []string{"100.96.11.0/24", "fd00:96:0:11::/64"}
	if _, err := admin.CoreV1().Nodes().Update(ctx, n1, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := b.Start(); err != nil {
		t.Fatal(err)
	}
	if err := c.WaitPeers(ctx, 1); err != nil {
		t.Fatal(err)
	}
	if got := addr(t, b, false).String(); got != "100.96.12.0" {
		t.Errorf("n2's subnet address %s, want 100.96.12.0 (from its podCIDR)", got)
	}
	ping(t, a, addr(t, b, false))
	ping(t, a, addr(t, b, true))
	n, err := admin.CoreV1().Nodes().Get(ctx, "n1", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if n.Annotations["tulle.dev/public-ip"] != "198.18.0.1" {
		t.Errorf("n1 annotations: %v", n.Annotations)
	}

	kc.StopAPIServer()
	deadline := time.Now().Add(60 * time.Second)
	for {
		s, err := a.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if s.NotReady != "" {
			t.Logf("not ready while the API server is down: %s", s.NotReady)
			if code, body := httpGet(t, a, "/readyz"); code != 503 || !strings.Contains(body, strings.TrimSpace(s.NotReady)[:10]) {
				t.Errorf("/readyz with the API server down: %d %q", code, body)
			}
			if code, _ := httpGet(t, a, "/healthz"); code != 200 {
				t.Errorf("/healthz with the API server down: %d (alive, only not ready)", code)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("tulled still ready 60s after the API server died")
		}
		time.Sleep(500 * time.Millisecond)
	}
	// The datapath does not care: the last known peers keep working.
	ping(t, a, addr(t, b, false))
	sent, got := transfer(t, a, b, addr(t, b, false), 20<<20, 0)
	if sent != got {
		t.Error("transfer corrupted while the API server was down")
	}
	if err := kc.StartAPIServer(); err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(90 * time.Second)
	for {
		s, err := a.Status(ctx)
		if code, _ := httpGetOK(a, "/readyz"); err == nil && s.NotReady == "" && code == 200 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("tulled not ready 90s after the API server came back: %v %+v", err, s)
		}
		time.Sleep(500 * time.Millisecond)
	}
}
