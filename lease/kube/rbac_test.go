package kube

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"slices"
	"testing"
	"time"

	authv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"

	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/scheme"

	"github.com/tulle-net/tulle/internal/kubetest"
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
	// In kube-system the same store is refused.
	if _, _, err := newStore(t, limited, ModeLease, nc, "kube-system", time.Minute).Lookup(cctx, "rbac-n1"); err == nil {
		t.Error("the tulled user could list Leases in kube-system")
	}
}
