package kube

import (
	"bytes"
	"context"
	"os"
	"testing"
	"time"

	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/scheme"

	"github.com/tulle-net/tulle/internal/kubetest"
	"github.com/tulle-net/tulle/lease"
)

// TestRBAC applies deploy/rbac.yaml, binds it also to the test's "tulled"
// user, and runs both modes with that user's client only.
func TestRBAC(t *testing.T) {
	needAPI(t)
	ctx := context.Background()
	b, err := os.ReadFile("../../deploy/rbac.yaml")
	if err != nil {
		t.Fatal(err)
	}
	user := rbacv1.Subject{Kind: rbacv1.UserKind, APIGroup: rbacv1.GroupName, Name: kubetest.TulledUser}
	for _, doc := range bytes.Split(b, []byte("\n---\n")) {
		obj, _, err := scheme.Codecs.UniversalDeserializer().Decode(doc, nil, nil)
		if err != nil {
			t.Fatalf("deploy/rbac.yaml: %v", err)
		}
		switch o := obj.(type) {
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
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	limited, err := kc.Client(kubetest.TulledToken)
	if err != nil {
		t.Fatal(err)
	}
	// Without the binding the user could not even read Nodes; check the
	// binding is what grants it.
	if _, err := limited.CoreV1().Namespaces().List(ctx, metav1.ListOptions{}); err == nil {
		t.Fatal("the tulled user can list namespaces: RBAC is not in force")
	}
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
	ls := newStore(t, limited, ModeLease, nc, "kube-system", time.Minute)
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
}
