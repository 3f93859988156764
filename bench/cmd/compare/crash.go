package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/walship/walship/bench/lab"
)

type trial struct {
	kind   string
	acked  int
	lost   int
	window time.Duration
}

// crashShippers are new shippers for one round of crash trials, in their order.
func crashShippers() []failoverShipper {
	return []failoverShipper{
		&walship{label: walshipDrain},
		&walship{label: walshipLiveDrain, live: true},
		&walship{label: walshipLost, hostLost: true},
		&pgReceivewal{},
		archiveCommand{label: archive5, timeout: "5"},
		archiveCommand{label: archive60, timeout: "60"},
	}
}

// crashKinds name the crash trials' shippers in their order, the crash table's rows.
var crashKinds = shipperNames(crashShippers())

func crashTrials(ctx context.Context, c config, r *results) error {
	for round := 1; round <= c.crashRounds; round++ {
		for _, ship := range crashShippers() {
			tr, err := crashTrial(ctx, c, ship)
			if err != nil {
				return fmt.Errorf("crash trial %d, %s: %w", round, ship.name(), err)
			}
			fmt.Printf("  round %d  %-30s acked %6d  lost %6d  window %s\n", round, ship.name(), tr.acked, tr.lost, tr.window.Round(time.Microsecond))
			r.trials = append(r.trials, tr)
		}
	}
	return nil
}

func crashTrial(ctx context.Context, c config, ship failoverShipper) (trial, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	n, err := newNode(ctx, c, ship)
	if err != nil {
		return trial{}, err
	}
	defer n.close()
	if err := ship.start(ctx, n); err != nil {
		return trial{}, err
	}
	sb, err := startStandby(ctx, n, ship)
	if err != nil {
		return trial{}, err
	}
	defer func() { cleanup("remove the standby", sb.Close()) }()
	load, err := lab.StartLoad(ctx, n.primary.DSN(), 1, 100)
	if err != nil {
		return trial{}, err
	}
	time.Sleep(time.Duration(3000+rand.IntN(2000)) * time.Millisecond) // the crash moment is the trial's random input
	killAt := time.Now()
	ship.crash()
	if err := n.primary.Kill(); err != nil {
		_ = load.Stop() // the kill's error is the one returned
		return trial{}, err
	}
	_ = load.Stop() // its error is expected: the server died
	acks := load.Acks()
	if err := ship.promote(ctx, n, sb); err != nil {
		return trial{}, err
	}
	loss, err := lab.MeasureLoss(ctx, sb, acks, killAt)
	if err != nil {
		return trial{}, err
	}
	return trial{kind: ship.name(), acked: len(acks), lost: len(loss.Lost), window: loss.Window}, nil
}
