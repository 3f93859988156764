package main

import (
	"context"
	"time"
)

func idleCost(ctx context.Context, c config, r *results) error {
	ship := &walship{label: walshipName}
	n, err := newNode(ctx, c, ship)
	if err != nil {
		return err
	}
	defer n.close()
	if err := ship.start(ctx, n); err != nil {
		return err
	}
	before := costs(ship.pids())
	time.Sleep(10 * time.Second) // the measured interval
	r.idle = spent(before, costs(ship.pids()))
	r.idleFor = 10 * time.Second
	return nil
}
