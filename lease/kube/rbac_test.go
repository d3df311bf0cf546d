package kube

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	admregv1 "k8s.io/api/admissionregistration/v1"
	authnv1 "k8s.io/api/authentication/v1"
	authv1 "k8s.io/api/authorization/v1"
	coordv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	ktypes "k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"

	"github.com/tulle-net/tulle/internal/netconf"
	"github.com/tulle-net/tulle/internal/tstest/kubetest"
	"github.com/tulle-net/tulle/lease"
)

// saUser is the ServiceAccount deploy/rbac.yaml binds, as the API server
// sees its requests.
var saUser = authv1.SubjectAccessReviewSpec{
	User:   "system:serviceaccount:tulle-system:tulle",
	Groups: []string{"system:serviceaccounts", "system:serviceaccounts:tulle-system", "system:authenticated"},
}

// applyRBAC creates the objects of a deploy/ RBAC file, binding each to the
// test's "tulled" user too.
func applyRBAC(t *testing.T, file string) {
	t.Helper()
	ctx := context.Background()
	b, err := os.ReadFile("../../deploy/" + file)
	if err != nil {
		t.Fatal(err)
	}
	user := rbacv1.Subject{Kind: rbacv1.UserKind, APIGroup: rbacv1.GroupName, Name: kubetest.TulledUser}
	for _, doc := range bytes.Split(b, []byte("\n---\n")) {
		obj, _, err := scheme.Codecs.UniversalDeserializer().Decode(doc, nil, nil)
		if err != nil {
			t.Fatalf("deploy/%s: %v", file, err)
		}
		switch o := obj.(type) {
		case *corev1.Namespace:
			// Another test (TestDeployManifests) may have made it.
			if _, err = admin.CoreV1().Namespaces().Create(ctx, o, metav1.CreateOptions{}); apierrors.IsAlreadyExists(err) {
				err = nil
			}
		case *corev1.ServiceAccount:
			_, err = admin.CoreV1().ServiceAccounts(o.Namespace).Create(ctx, o, metav1.CreateOptions{})
		case *rbacv1.ClusterRole:
			_, err = admin.RbacV1().ClusterRoles().Create(ctx, o, metav1.CreateOptions{})
		case *rbacv1.ClusterRoleBinding:
			o.Subjects = append(o.Subjects, user)
			_, err = admin.RbacV1().ClusterRoleBindings().Create(ctx, o, metav1.CreateOptions{})
		case *rbacv1.Role:
			_, err = admin.RbacV1().Roles(o.Namespace).Create(ctx, o, metav1.CreateOptions{})
		case *rbacv1.RoleBinding:
			o.Subjects = append(o.Subjects, user)
			_, err = admin.RbacV1().RoleBindings(o.Namespace).Create(ctx, o, metav1.CreateOptions{})
		case *admregv1.ValidatingAdmissionPolicy:
			_, err = admin.AdmissionregistrationV1().ValidatingAdmissionPolicies().Create(ctx, o, metav1.CreateOptions{})
		case *admregv1.ValidatingAdmissionPolicyBinding:
			_, err = admin.AdmissionregistrationV1().ValidatingAdmissionPolicyBindings().Create(ctx, o, metav1.CreateOptions{})
		default:
			t.Fatalf("deploy/%s: unexpected %T", file, obj)
		}
		if err != nil {
			t.Fatalf("deploy/%s: %v", file, err)
		}
	}
}

// access is one SubjectAccessReview question.
type access struct {
	verb, group, resource, sub, ns, name string
	allowed                              bool
}

func (a access) String() string {
	return fmt.Sprintf("%s %s/%s %s in %q named %q", a.verb, a.group, a.resource, a.sub, a.ns, a.name)
}

// checkAccess asks the API server, for the ServiceAccount, each question.
func checkAccess(t *testing.T, stage string, want []access) {
	t.Helper()
	for _, w := range want {
		spec := saUser
		spec.ResourceAttributes = &authv1.ResourceAttributes{Verb: w.verb, Group: w.group, Resource: w.resource, Subresource: w.sub, Namespace: w.ns, Name: w.name}
		r, err := admin.AuthorizationV1().SubjectAccessReviews().Create(context.Background(), &authv1.SubjectAccessReview{Spec: spec}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if r.Status.Allowed != w.allowed {
			t.Errorf("%s: %s: allowed = %v, want %v (%s)", stage, w, r.Status.Allowed, w.allowed, r.Status.Reason)
		}
	}
}

// TestRBAC applies deploy/rbac.yaml, then deploy/rbac-lease-mode.yaml, runs
// each mode with only the permissions bound so far, and checks with
// SubjectAccessReview that the ServiceAccount can do what tulled needs and
// cannot touch the control plane's Leases.
func TestRBAC(t *testing.T) {
	needAPI(t)
	ctx := context.Background()
	applyRBAC(t, "rbac.yaml")
	limited, err := kc.Client(kubetest.TulledToken)
	if err != nil {
		t.Fatal(err)
	}
	// Without the binding the user could not even read Nodes; check the
	// binding is what grants it.
	if _, err := limited.CoreV1().Secrets("kube-system").List(ctx, metav1.ListOptions{}); err == nil {
		t.Fatal("the tulled user can list secrets: RBAC is not in force")
	}
	never := []access{
		{"update", "coordination.k8s.io", "leases", "", "kube-system", "kube-controller-manager", false},
		{"update", "coordination.k8s.io", "leases", "", "kube-system", "kube-scheduler", false},
		{"get", "coordination.k8s.io", "leases", "", "kube-system", "kube-controller-manager", false},
		{"create", "coordination.k8s.io", "leases", "", "kube-node-lease", "", false},
		{"delete", "coordination.k8s.io", "leases", "", "kube-system", "kube-scheduler", false},
		{"get", "", "secrets", "", "tulle-system", "", false},
		{"list", "", "secrets", "", "", "", false},
		{"create", "", "pods", "", "x", "", false},
		{"update", "", "pods", "", "x", "p", false},
		{"delete", "", "pods", "", "x", "p", false},
		{"update", "", "namespaces", "", "", "x", false},
		{"create", "networking.k8s.io", "networkpolicies", "", "x", "", false},
		{"delete", "networking.k8s.io", "networkpolicies", "", "x", "np", false},
		{"update", "", "nodes", "", "", "n1", false},
		{"patch", "", "nodes", "", "", "n1", false},
		{"delete", "", "nodes", "", "", "n1", false},
	}
	nodes := []access{
		{"get", "", "nodes", "", "", "n1", true},
		{"list", "", "nodes", "", "", "", true},
		{"watch", "", "nodes", "", "", "", true},
		{"patch", "", "nodes", "status", "", "n1", true},
	}
	// NetworkPolicy: read pods, namespaces and policies, cluster-wide.
	for _, r := range []struct{ group, resource string }{{"", "pods"}, {"", "namespaces"}, {"networking.k8s.io", "networkpolicies"}} {
		for _, v := range []string{"get", "list", "watch"} {
			nodes = append(nodes, access{v, r.group, r.resource, "", "", "", true})
		}
	}
	checkAccess(t, "rbac.yaml", append(append(slices.Clone(never), nodes...),
		access{"get", "coordination.k8s.io", "leases", "", "tulle-system", "", false},
		access{"create", "coordination.k8s.io", "leases", "", "tulle-system", "", false}))

	nc := netConf(t, dualStack)
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	createNode(t, "rbac-n1", "100.96.41.0/24", "fd00:96:0:41::/64")
	createNode(t, "rbac-n2", "100.96.42.0/24", "fd00:96:0:42::/64")
	for _, n := range []string{"rbac-n1", "rbac-n2"} {
		if _, err := newStore(t, limited, ModePodCIDR, nc, "", 0).Claim(cctx, n, attrs("198.18.0.4")); err != nil {
			t.Fatalf("podcidr claim as tulled: %v", err)
		}
	}
	ch, err := newStore(t, limited, ModePodCIDR, nc, "", 0).WatchPeers(cctx, "rbac-n1")
	if err != nil {
		t.Fatal(err)
	}
	waitPeers(t, ch, "rbac-n2", func(p []lease.Peer) bool {
		for _, x := range p {
			if x.Node == "rbac-n2" {
				return true
			}
		}
		return false
	})

	applyRBAC(t, "node-identity.yaml")
	own := podToken(t, "rbac-n1")
	checkNodeIdentity(t, own, nc)

	applyRBAC(t, "rbac-lease-mode.yaml")
	var leases []access
	for _, v := range []string{"get", "list", "watch", "create", "update", "delete"} {
		leases = append(leases, access{v, "coordination.k8s.io", "leases", "", "tulle-system", "", true})
	}
	checkAccess(t, "rbac.yaml + rbac-lease-mode.yaml", append(append(never, nodes...), leases...))
	ls := newStore(t, limited, ModeLease, nc, "tulle-system", time.Minute)
	l, err := ls.Claim(cctx, "rbac-n1", attrs("198.18.0.4"))
	if err != nil {
		t.Fatalf("lease claim as tulled: %v", err)
	}
	if _, err := ls.Renew(cctx, l); err != nil {
		t.Fatalf("lease renew as tulled: %v", err)
	}
	lch, err := ls.WatchPeers(cctx, "rbac-n2")
	if err != nil {
		t.Fatal(err)
	}
	waitPeers(t, lch, "rbac-n1's lease", func(p []lease.Peer) bool { return len(p) == 1 })
	if err := ls.Release(cctx, l); err != nil {
		t.Fatalf("lease release as tulled: %v", err)
	}
	checkLeaseIdentity(t, own, limited, nc)
	// In kube-system the same store is refused.
	if _, _, err := newStore(t, limited, ModeLease, nc, "kube-system", time.Minute).Lookup(cctx, "rbac-n1"); err == nil {
		t.Error("the tulled user could list Leases in kube-system")
	}
}

// podToken returns a client with tulle's ServiceAccount token bound to a
// pod on node, as the DaemonSet's pods get it.
func podToken(t *testing.T, node string) kubernetes.Interface {
	t.Helper()
	ctx := context.Background()
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "tulle-" + node, Namespace: "tulle-system"},
		Spec: corev1.PodSpec{ServiceAccountName: "tulle", NodeName: node, AutomountServiceAccountToken: new(false),
			Containers: []corev1.Container{{Name: "tulled", Image: "tulle:latest"}}}}
	pod, err := admin.CoreV1().Pods("tulle-system").Create(ctx, pod, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		admin.CoreV1().Pods("tulle-system").Delete(context.Background(), pod.Name, metav1.DeleteOptions{})
	})
	tr, err := admin.CoreV1().ServiceAccounts("tulle-system").CreateToken(ctx, "tulle", &authnv1.TokenRequest{Spec: authnv1.TokenRequestSpec{
		BoundObjectRef: &authnv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID}}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	c, err := kc.Client(tr.Status.Token)
	if err != nil {
		t.Fatal(err)
	}
	r, err := c.AuthenticationV1().SelfSubjectReviews().Create(ctx, &authnv1.SelfSubjectReview{}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got := r.Status.UserInfo.Extra[nodeNameExtra]; len(got) != 1 || got[0] != node {
		t.Fatalf("the pod-bound token names node %v, want %s: the policy has nothing to compare", got, node)
	}
	return c
}

const nodeNameExtra = "authentication.kubernetes.io/node-name"

// forbidden checks that err is the API server's 403 carrying the node
// identity policy's message.
func forbidden(t *testing.T, what string, err error, msg string) {
	t.Helper()
	switch {
	case err == nil:
		t.Errorf("%s: allowed, want refused by the node identity policy", what)
	case !apierrors.IsForbidden(err) || !strings.Contains(err.Error(), "tulle-node-identity") || !strings.Contains(err.Error(), msg):
		t.Errorf("%s: %v, want 403 from tulle-node-identity saying %q", what, err, msg)
	}
}

// checkNodeIdentity: with deploy/node-identity.yaml in force, a token bound
// to a pod on rbac-n1 publishes rbac-n1 through the podcidr store, and is
// refused (403, the policy's message) another Node and, on its own Node,
// anything but tulle's annotations and NetworkUnavailable.
func checkNodeIdentity(t *testing.T, own kubernetes.Interface, nc *netconf.Config) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	s := newStore(t, own, ModePodCIDR, nc, "", 0)
	// The API server loads a new policy in the background: wait for it
	// with dry runs, which go through admission and change nothing.
	probe := []byte(`{"metadata":{"annotations":{"tulle.dev/public-ip":"198.18.0.66"}}}`)
	dry := metav1.PatchOptions{DryRun: []string{metav1.DryRunAll}}
	for {
		_, err := own.CoreV1().Nodes().Patch(ctx, "rbac-n2", ktypes.MergePatchType, probe, dry, "status")
		if err != nil {
			forbidden(t, "dry run: publish rbac-n2 as rbac-n1", err, "tulle on node rbac-n1 may not change Node rbac-n2: only its own")
			break
		}
		if ctx.Err() != nil {
			t.Fatal("the node identity policy never took effect")
		}
		time.Sleep(100 * time.Millisecond)
	}
	forbidden(t, "publish rbac-n2 as rbac-n1", s.publishNode(ctx, "rbac-n2", attrs("198.18.0.66")),
		"tulle on node rbac-n1 may not change Node rbac-n2: only its own")
	n2, err := admin.CoreV1().Nodes().Get(ctx, "rbac-n2", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if ip := n2.Annotations[AnnPublicIP]; ip == "198.18.0.66" {
		t.Fatal("rbac-n2's public IP is the one rbac-n1's token tried to set")
	}
	l, err := s.Claim(ctx, "rbac-n1", attrs("198.18.0.65"))
	if err != nil {
		t.Fatalf("podcidr claim of its own Node with the pod-bound token: %v", err)
	}
	if err := s.Release(ctx, l); err != nil {
		t.Fatalf("release of its own Node: %v", err)
	}
	if _, err := s.Claim(ctx, "rbac-n1", attrs("198.18.0.65")); err != nil {
		t.Fatalf("claim again: %v", err)
	}
	for _, c := range []struct{ name, patch, msg string }{
		{"a label", `{"metadata":{"labels":{"node-role.kubernetes.io/control-plane":""}}}`, "may change only the NetworkUnavailable condition"},
		{"another annotation", `{"metadata":{"annotations":{"example.com/x":"y"}}}`, "may change only the tulle.dev/ annotations"},
		{"another condition", `{"status":{"conditions":[{"type":"DiskPressure","status":"True","reason":"Forged"}]}}`, "may change only the NetworkUnavailable condition"},
		{"its addresses", `{"status":{"addresses":[{"type":"InternalIP","address":"198.18.0.99"}]}}`, "may change only the NetworkUnavailable condition"},
	} {
		before, err := admin.CoreV1().Nodes().Get(ctx, "rbac-n1", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		_, err = own.CoreV1().Nodes().Patch(ctx, "rbac-n1", ktypes.StrategicMergePatchType, []byte(c.patch), metav1.PatchOptions{}, "status")
		forbidden(t, "change "+c.name+" of its own Node", err, c.msg)
		after, err := admin.CoreV1().Nodes().Get(ctx, "rbac-n1", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if after.ResourceVersion != before.ResourceVersion {
			t.Errorf("change %s of its own Node: the Node changed", c.name)
		}
	}
}

// checkLeaseIdentity: in lease mode the same token claims, renews and
// releases Leases as rbac-n1 and is refused holding one as rbac-n2 or
// deleting rbac-n2's.
func checkLeaseIdentity(t *testing.T, own, limited kubernetes.Interface, nc *netconf.Config) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	s := newStore(t, own, ModeLease, nc, "tulle-system", time.Minute)
	l, err := s.Claim(ctx, "rbac-n1", attrs("198.18.0.65"))
	if err != nil {
		t.Fatalf("lease claim with the pod-bound token: %v", err)
	}
	if _, err := s.Renew(ctx, l); err != nil {
		t.Fatalf("lease renew with the pod-bound token: %v", err)
	}
	if err := s.Release(ctx, l); err != nil {
		t.Fatalf("lease release with the pod-bound token: %v", err)
	}
	short, cancelShort := context.WithTimeout(ctx, 3*time.Second)
	_, err = s.Claim(short, "rbac-n2", attrs("198.18.0.66"))
	cancelShort()
	if err == nil || !strings.Contains(err.Error(), `tulle on node rbac-n1 may hold Leases only as itself, not as "rbac-n2"`) {
		t.Errorf("lease claim as rbac-n2 with rbac-n1's token: %v, want refused by the node identity policy", err)
	}
	theirs, err := newStore(t, limited, ModeLease, nc, "tulle-system", time.Minute).Claim(ctx, "rbac-n2", attrs("198.18.0.66"))
	if err != nil {
		t.Fatal(err)
	}
	err = own.CoordinationV1().Leases("tulle-system").Delete(ctx, leaseName(theirs.Key()), metav1.DeleteOptions{})
	forbidden(t, "delete rbac-n2's Lease", err, `may delete only its own Leases`)
	var o *coordv1.Lease
	if o, err = admin.CoordinationV1().Leases("tulle-system").Get(ctx, leaseName(theirs.Key()), metav1.GetOptions{}); err != nil || ptrString(o.Spec.HolderIdentity) != "rbac-n2" {
		t.Errorf("rbac-n2's Lease after the refused delete: %v", err)
	}
}
