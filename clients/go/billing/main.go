// Command billing lists the plans of the Trellis billing system through the
// mesh edge, with the Go stubs generated from proto/ (scripts/gen-clients go).
//
//	billing [-edge 127.0.0.1:8080] [-plan basic]
//
// It calls telco.user.v1.UserService/ListPlans in plaintext h2c and prints
// one line per plan; with -plan it also fetches that plan with GetPlan.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/status"

	userv1 "trellis/gen/telco/user/v1"
)

func main() {
	edge := flag.String("edge", "127.0.0.1:8080", "the edge, host:port (plaintext h2c)")
	planID := flag.String("plan", "", "also fetch this plan with GetPlan")
	timeout := flag.Duration("timeout", 10*time.Second, "deadline of each call")
	flag.Parse()

	conn, err := grpc.Dial(*edge, grpc.WithInsecure())
	if err != nil {
		fail("dialing %s: %v", *edge, err)
	}
	defer conn.Close()
	users := userv1.NewUserServiceClient(conn)

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	listed, err := users.ListPlans(ctx, &userv1.ListPlansRequest{})
	if err != nil {
		fail("ListPlans: %s", describe(err))
	}
	if len(listed.GetPlans()) == 0 {
		fail("ListPlans: the catalogue is empty")
	}
	for _, p := range listed.GetPlans() {
		fmt.Printf("%-6s %-12s %6d %s cents/month  %d MB, %d s voice, %d SMS included\n",
			p.GetId(), p.GetName(), p.GetMonthlyFeeCents(), p.GetCurrencyCode(),
			p.GetIncludedDataMb(), p.GetIncludedVoiceSeconds(), p.GetIncludedSms())
	}

	if *planID != "" {
		got, err := users.GetPlan(ctx, &userv1.GetPlanRequest{PlanId: *planID})
		if err != nil {
			fail("GetPlan %q: %s", *planID, describe(err))
		}
		fmt.Printf("GetPlan %s: %d %s cents/month\n", got.GetPlan().GetId(),
			got.GetPlan().GetMonthlyFeeCents(), got.GetPlan().GetCurrencyCode())
	}
}

// describe renders a gRPC error as "CODE: message".
func describe(err error) string {
	s := status.Convert(err)
	return fmt.Sprintf("%s: %s", s.Code(), s.Message())
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "billing: "+format+"\n", args...)
	os.Exit(1)
}
