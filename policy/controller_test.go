package policy

import (
	"context"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	"sigs.k8s.io/knftables"

	"github.com/tulle-net/tulle/internal/api"
)

func apiPod(ns, name, uid, node string, labels map[string]string, ips ...string) *corev1.Pod {
	p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, UID: types.UID("uid-" + uid), Labels: labels}, Spec: corev1.PodSpec{NodeName: node}}
	for _, ip := range ips {
		p.Status.PodIPs = append(p.Status.PodIPs, corev1.PodIP{IP: ip})
	}
	return p
}

// startController runs a controller until the returned stop (or the
// test's end).
func startController(t *testing.T, client *fake.Clientset, nft *knftables.Fake, state string) (*Controller, func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	c := New(Options{Client: client, Node: "n1", Subnets: []netip.Prefix{netip.MustParsePrefix("100.64.1.0/24")}, NFT: nft, StateFile: state, Debounce: time.Millisecond})
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("run: %v", err)
			}
		})
	}
	t.Cleanup(stop)
	return c, stop
}

func waitFor(t *testing.T, what string, f func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if f() {
			return
		}
	}
	t.Fatalf("%s: not within 5 s", what)
}

// hasElem reports whether set or map holds key, read under the fake's
// lock (the controller writes it meanwhile).
func hasElem(nft *knftables.Fake, set, key string) bool {
	for _, kind := range []string{"set", "map"} {
		els, err := nft.ListElements(context.Background(), kind, set)
		if err != nil {
			continue
		}
		for _, e := range els {
			if len(e.Key) == 1 && e.Key[0] == key {
				return true
			}
		}
	}
	return false
}

// hasSet reports whether the table holds set.
func hasSet(nft *knftables.Fake, set string) bool {
	names, _ := nft.List(context.Background(), "sets")
	return slices.Contains(names, set)
}

// TestAttach: the CNI plugin's ADD returns once the pod's rules are in the
// table, before the pod's status names its address; an attachment for a
// pod the API server does not have (or another pod of that name) is
// refused; attachments survive a restart.
func TestAttach(t *testing.T) {
	ctx := context.Background()
	deny := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "deny"},
		Spec: networkingv1.NetworkPolicySpec{PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "a"}}, PolicyTypes: ingress}}
	// The pod exists, with no address in its status yet (the kubelet
	// writes it after ADD).
	client := fake.NewClientset(&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "x"}}, apiPod("x", "a", "1", "n1", map[string]string{"app": "a"}), deny)
	nft := knftables.NewFake(knftables.InetFamily, TableName)
	state := filepath.Join(t.TempDir(), "attachments.json")
	c, stop := startController(t, client, nft, state)
	waitFor(t, "first apply", func() bool { return c.Ready() == nil })

	actx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	ip := netip.MustParseAddr("100.64.1.7")
	if err := c.Attach(actx, api.Attachment{Namespace: "x", Name: "a", UID: "uid-1", ContainerID: "c1", IPs: []netip.Addr{ip}}); err != nil {
		t.Fatal(err)
	}
	// When Attach returns, the rules are there: no waiting.
	if !hasElem(nft, "local-v4", ip.String()) || !hasElem(nft, "ingress-v4", ip.String()) {
		t.Fatalf("after Attach the pod is not isolated:\n%s", nft.Dump())
	}
	for _, tc := range []struct {
		name string
		a    api.Attachment
		want string
	}{
		{"unknown pod", api.Attachment{Namespace: "x", Name: "ghost", ContainerID: "c2", IPs: []netip.Addr{ip}}, "not found"},
		{"other pod of that name", api.Attachment{Namespace: "x", Name: "a", UID: "uid-9", ContainerID: "c3", IPs: []netip.Addr{ip}}, "UID"},
		{"address not on this node", api.Attachment{Namespace: "x", Name: "a", UID: "uid-1", ContainerID: "c4", IPs: []netip.Addr{netip.MustParseAddr("100.64.2.7")}}, "not in this node's pod subnets"},
		{"no address", api.Attachment{Namespace: "x", Name: "a", ContainerID: "c5"}, "needs"},
	} {
		if err := c.Attach(actx, tc.a); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error with %q", tc.name, err, tc.want)
		}
	}

	// A static pod: the kubelet attaches it under its own UID, the API
	// server holds a mirror with another.
	mirror := apiPod("x", "static", "m", "n1", map[string]string{"app": "a"})
	mirror.Annotations = map[string]string{corev1.MirrorPodAnnotationKey: "hash"}
	if _, err := client.CoreV1().Pods("x").Create(ctx, mirror, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	sip := netip.MustParseAddr("100.64.1.8")
	if err := c.Attach(actx, api.Attachment{Namespace: "x", Name: "static", UID: "hash", ContainerID: "c6", IPs: []netip.Addr{sip}}); err != nil {
		t.Fatalf("static pod: %v", err)
	}
	if !hasElem(nft, "ingress-v4", sip.String()) {
		t.Fatalf("the static pod is not isolated:\n%s", nft.Dump())
	}

	// A policy created just before its pod: the pod's ADD returns with it
	// in force, whatever the informer had seen.
	late := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "late"},
		Spec: networkingv1.NetworkPolicySpec{PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "late"}}, PolicyTypes: egress}}
	if _, err := client.NetworkingV1().NetworkPolicies("x").Create(ctx, late, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := client.CoreV1().Pods("x").Create(ctx, apiPod("x", "late", "l", "n1", map[string]string{"app": "late"}), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	lip := netip.MustParseAddr("100.64.1.9")
	if err := c.Attach(actx, api.Attachment{Namespace: "x", Name: "late", UID: "uid-l", ContainerID: "c7", IPs: []netip.Addr{lip}}); err != nil {
		t.Fatal(err)
	}
	if !hasElem(nft, "egress-v4", lip.String()) {
		t.Fatalf("a policy created before its pod is not in force when ADD returns:\n%s", nft.Dump())
	}

	// A restart: the table as it was, then rebuilt with the attachment
	// from the state file, before any pod status names the address.
	stop()
	c2, _ := startController(t, client, nft, state)
	waitFor(t, "restarted controller applied", func() bool { return c2.Ready() == nil })
	if !hasElem(nft, "ingress-v4", ip.String()) {
		t.Fatalf("after a restart the attached pod is not isolated:\n%s", nft.Dump())
	}

	// DEL forgets the address: it is unattached (dropped) again.
	c2.Detach("c1")
	waitFor(t, "detach applied", func() bool { return !hasElem(nft, "local-v4", ip.String()) })
}

// TestPolicyFollowsAPI: a policy, a label and a pod deletion reach the
// table.
func TestPolicyFollowsAPI(t *testing.T) {
	ctx := context.Background()
	client := fake.NewClientset(&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "x"}},
		apiPod("x", "a", "1", "n1", map[string]string{"app": "a"}, "100.64.1.2"),
		apiPod("x", "b", "2", "n2", map[string]string{"app": "b"}, "100.64.2.2"))
	nft := knftables.NewFake(knftables.InetFamily, TableName)
	c, _ := startController(t, client, nft, "")
	waitFor(t, "first apply", func() bool { return c.Ready() == nil })
	if !hasElem(nft, "local-v4", "100.64.1.2") || hasElem(nft, "ingress-v4", "100.64.1.2") {
		t.Fatalf("a: want known, not isolated:\n%s", nft.Dump())
	}
	pol := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "from-b"},
		Spec: networkingv1.NetworkPolicySpec{PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "a"}},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "b"}}}}}}}}
	if _, err := client.NetworkingV1().NetworkPolicies("x").Create(ctx, pol, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	peers := "pol-" + id("x/from-b") + "-in0-v4"
	waitFor(t, "policy applied", func() bool { return hasElem(nft, "ingress-v4", "100.64.1.2") && hasElem(nft, peers, "100.64.2.2") })
	// b loses its label: no longer a peer; the rule allows nothing.
	b, _ := client.CoreV1().Pods("x").Get(ctx, "b", metav1.GetOptions{})
	b.Labels = map[string]string{"app": "other"}
	if _, err := client.CoreV1().Pods("x").Update(ctx, b, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "label change applied", func() bool { return !hasSet(nft, peers) })
	st := c.Status()
	if len(st.Pods) != 1 || !st.Pods[0].IngressIsolated || st.Pods[0].Policies[0] != "x/from-b" {
		t.Errorf("status: %+v", st.Pods)
	}
	if err := client.CoreV1().Pods("x").Delete(ctx, "a", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "pod deletion applied", func() bool { return !hasElem(nft, "local-v4", "100.64.1.2") })
}
