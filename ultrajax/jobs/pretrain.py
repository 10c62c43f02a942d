"""MAE / UltraMIM pretraining across clients: federated (UltraFedFM) or centralized.

The script, in order:
  1. check the config; build the mesh, the client sources (phantom | folder | manifest, each
     doubled with its SMAT scan-mode partners) and their Grain pipelines;
  2. build the MAE and its per-client AdamW states, sharded by the config's rules;
  3. resume: own workdir checkpoint -> config.init_from -> scratch;
  4. each round: broadcast the server params to the C clients; run every client's local
     epoch as compiled chunks of K steps (vmap over clients of a scan over steps; clients
     with fewer steps are masked); aggregate with weights n_k / n; log, draw, checkpoint.
Centralized training is the same program with every image in one client. The pieces live under
their nouns: the checks in pretrain_checks.py, the clients in data/clients.py, the objective
in train/mim_objectives.py, the compiled round programs in train/mim_programs.py.

Targets (config.target): 'pixels' (MAE / UltraMIM norm-pix) or 'teacher' (URFM's feature MIM:
the decoder predicts a frozen CLIP-style teacher's tokens of the clean image at the masked
patches). The teacher's parameters are an input of the compiled chunk, never trained: they are
not in the optimizer or client states and its targets pass through stop_gradient. With
config.teacher.cache_dir and a fixed-view schedule the targets are computed once, stored with
the fixed views (data/teacher_cache.py) and read with each batch instead.

A round's K-step chunk is the unit of compilation: a real round (an epoch of every client)
cannot sit on device at once, so C, K and the batch are static and the round loops over
chunks on the host. Every random draw comes from key(seed, round, client, step), and the data
order from the Grain iterators saved in each checkpoint, so a resumed run is bitwise equal
to an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import pathlib
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import periodic_actions
from flax import nnx

from ultrajax import configlib
from ultrajax.data import clients as clients_lib, pipeline
from ultrajax.eval import evaluators
from ultrajax.fed import participation, rounds
from ultrajax.interop import load as interop_load
from ultrajax.models import mae
from ultrajax.pretrain_checks import check_layout, make_strategy, validate
from ultrajax.train import (
  checkpoint,
  divergence,
  loop,
  mim_objectives,
  mim_programs,
  perf,
  resume,
  sharding,
  timing,
  writers,
)
from ultrajax.viz import attention as attention_viz, features as feature_viz, reconstruction

# Fault injection for tests: 'R,J' SIGKILLs this process after chunk J of round R (1-based), e.g.
# mid-round while the last checkpoint is still being written, as a crash or a preempted VM would.
KILL_AT_ENV = "ULTRAJAX_KILL_AT"


def _resume_or_init(config, ckpt, programs, data, seed_key):
  """(first round to run, server params, dict(opt=client optimizer states, strategy=state))."""
  abstract_params = jax.eval_shape(programs.init_params, seed_key)
  like_params = checkpoint.abstract_like(abstract_params, programs.server_sharding)
  like_train = dict(
    opt=checkpoint.abstract_like(programs.abstract_opt, programs.opt_sharding),
    strategy=checkpoint.abstract_like(programs.abstract_strategy, programs.strategy_sharding),
  )

  def init():
    params = programs.init_params(seed_key)
    if config.init_from:
      # An ultrajax workdir/checkpoint, or an official-MAE / timm file (.pth, .safetensors);
      # an encoder-only file keeps the freshly initialised decoder.
      abstract_model = nnx.eval_shape(lambda: mae.mae_from_config(config.model, nnx.Rngs(0)))
      params = interop_load.load_init_params(
        config.init_from, abstract_model, base_params=params, target=like_params
      )
      logging.info("Initialised from %s.", config.init_from)
    return params, dict(opt=programs.init_opt(params), strategy=programs.init_strategy(params))

  return loop.resume_or_init(ckpt, like_params, like_train, init, config=config, data_iterator=data)


def run(config: ml_collections.ConfigDict, workdir: str, *, stop_after_rounds: int | None = None):
  """Trains to config.fed.num_rounds, resuming from workdir. Returns the server params.

  stop_after_rounds: return after that round as if the process were killed there (no extra
  checkpoint) — lets tests check that resuming reproduces an uninterrupted run.
  One process per workdir: a second one stops at the workdir lock (train/resume.py).
  """
  validate(config)
  with resume.WorkdirLock(workdir):
    return _run(config, pathlib.Path(workdir), stop_after_rounds)


def _run(config, workdir: pathlib.Path, stop_after_rounds: int | None):
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh.clients, config.mesh.data)
  logging.info("Mesh: %s", dict(mesh.shape))
  # None when config.evals are all off; test outputs kept under evals/ for the summary's test.
  probes = evaluators.for_pretraining(config, mesh, outputs_dir=workdir / "evals")

  clients = clients_lib.client_sources(config)
  num_clients, batch = len(clients), config.data.batch_size
  check_layout(config, mesh, num_clients, f"{num_clients} clients")
  image_size = config.model.image_size
  seed_key = jax.random.key(config.seed)
  teacher, cached = None, False
  if config.target == "teacher":
    teacher = mim_objectives.build_teacher(config, seed_key)
    cached = bool(config.teacher.cache_dir)
    logging.info(
      "Feature targets: teacher block %s%s, %s-normalised, %s loss, %s alignment, %s.",
      config.teacher.block or "last",
      " + final norm" * config.teacher.final_norm,
      config.teacher.norm,
      config.teacher.loss,
      config.teacher.align,
      "cached" if cached else "computed in the step",
    )
  if cached:
    targets = jax.jit(
      lambda params, images: mim_objectives.teacher_targets(
        teacher[0], params, images.astype(jnp.float32) / 255.0, config
      )
    )
    data = clients_lib.teacher_batches(config, clients, teacher[1], targets)
  else:
    data = pipeline.ClientBatches(
      clients,
      batch,
      image_size,
      seed=config.seed,
      crop_scale=tuple(config.data.crop_scale),
      hflip=config.data.hflip,
      num_threads=config.data.num_threads,
      worker_count=config.data.get("worker_count", 0),
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
  steps_per_round = data.steps_per_epoch * config.fed.local_epochs
  f = config.fed
  lanes_axis = mesh.shape["clients"]
  # At most as many lanes as a round can have clients (sampled rounds hold fewer).
  most = (
    num_clients
    if f.sampling == "poisson"
    else participation.count(f.clients_per_round, num_clients)
  )
  num_lanes = f.lanes or min(
    rounds.auto_lanes(steps_per_round, lanes_axis), math.ceil(most / lanes_axis) * lanes_axis
  )
  configlib.check(
    num_lanes % mesh.shape["clients"] == 0,
    f"config.fed.lanes={num_lanes} is not a multiple of config.mesh.clients="
    f"{mesh.shape['clients']}",
  )
  plan, chunk_steps = rounds.plan_chunked(steps_per_round, num_lanes, f.chunk_steps)
  try:
    strategy = make_strategy(config).for_run(num_clients, f.clients_per_round, f.sampling)
    strategy = strategy.for_data(batch, data.num_images, steps_per_round)  # DP-SGD's rates
  except ValueError as e:
    raise configlib.ConfigError(f"config.fed.strategy={f.strategy!r}: {e}") from None
  weights = strategy.client_weights(data.num_images)
  for c, source in enumerate(clients):
    logging.info(
      "client %2d %-28s %7d images (SMAT pairs included) %4d steps/round weight %.4f",
      c,
      source.name,
      data.num_images[c],
      steps_per_round[c],
      weights[c],
    )
  logging.info(
    "%d clients on %d lanes: %d steps per round, %.0f%% of lane steps busy.",
    num_clients,
    num_lanes,
    plan.client_ids.shape[1],
    100 * (plan.client_ids >= 0).mean(),
  )

  with jax.set_mesh(mesh):
    model_key, train_key, preview_key = jax.random.split(seed_key, 3)
    programs = mim_programs.Programs(
      config, mesh, num_clients, num_lanes, teacher=teacher, cached=cached, strategy=strategy
    )

    ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
    start, params, train = _resume_or_init(config, ckpt, programs, data, model_key)
    writer = writers.create_writer(workdir)
    if jax.process_index() == 0:
      writers.truncate_jsonl(workdir / "metrics.jsonl", start)
    writers.log_parameter_overview(params)
    if start == 0:
      writer.write_hparams(config.to_dict())  # nested: TensorBoard gets 'model.width', ...
      if probes:  # random init: the baseline the later rounds' figures are read against
        writer.write_scalars(0, dict(round=0, **probes.at_round(params, 0)))
    progress = periodic_actions.ReportProgress(num_train_steps=config.fed.num_rounds, every_steps=1)
    preview = clients_lib.preview_images(clients, image_size)
    # The encoder's last-block cls attention per head on the clean preview images (UltraFedFM
    # Figs. 7-8), every attention_every_rounds rounds (0 = never).
    attention_maps = jax.jit(
      lambda p, x: nnx.merge(programs.graphdef, p).encoder.attention_maps(
        mae.normalize(x.astype(jnp.float32) / 255.0)
      ),
      out_shardings=programs.replicated,
    )
    pairs = clients_lib.smat_pairs(clients) if start == 0 and jax.process_index() == 0 else []
    if pairs:
      reconstruction.save_pairs(
        workdir / "images" / "smat_pairs.png", pairs, title="SMAT scan-mode partners"
      )
    weights_dev = loop.put_global(weights, programs.replicated)
    steps_dev = loop.put_global(steps_per_round.astype(np.float32), programs.replicated)
    meta = dict(process_count=jax.process_count(), config=config.to_json_best_effort())
    partial = f.sampling == "poisson" or f.clients_per_round != 0 or f.dropout > 0
    last = (
      config.fed.num_rounds
      if stop_after_rounds is None
      else min(config.fed.num_rounds, stop_after_rounds)
    )

    clock = timing.CompileClock()
    profile_dir = os.path.join(workdir, "profile")  # config.profile_round's trace
    if jax.process_count() > 1:  # one folder per process: each writes its own trace
      profile_dir = os.path.join(profile_dir, f"process_{jax.process_index()}")
    kill_at = tuple(int(x) for x in os.environ.get(KILL_AT_ENV, "0,0").split(","))
    for r in range(start, last):
      why = strategy.stop_reason(r, train["strategy"])
      if why:  # e.g. the privacy budget: keep round r's state and end the run cleanly
        logging.warning("Stopping before round %d: %s", r + 1, why)
        if r > 0 and ckpt.latest_step() != r:
          ckpt.save(r, params, train, data, dict(meta, round=r))
        break
      t0 = timing.now()
      profiling = r + 1 == config.profile_round
      if profiling:
        jax.profiler.start_trace(profile_dir, create_perfetto_trace=True)
      round_key = rounds.round_key(train_key, r)
      # Every round, the first after a resume included: the clients' optimizer states that
      # round r starts from do not depend on where the run stopped.
      if f.reset_client_optimizer:
        train["opt"] = programs.init_opt(params)
      drawn = participation.draw(
        data.num_images, r, config.seed, f.clients_per_round, f.sampling, f.dropout
      )
      plan = rounds.plan_round(steps_per_round * drawn.participants, num_lanes, chunk_steps)
      state = programs.start_round(params, train["opt"], train["strategy"])
      round_index = loop.put_global(np.int32(r), programs.replicated)
      losses, grad_norms = [np.zeros((num_lanes, 0))], [np.zeros((num_lanes, 0))]
      for j in range(plan.client_ids.shape[1] // chunk_steps):
        p = plan.chunk(j, chunk_steps)
        # Loading the next chunk overlaps with the device still running the previous one.
        # This process's batch (an array, or a dict of arrays for cached targets).
        local = data.next_batches(p.client_ids)
        images = jax.tree.map(sharding.global_batch, local, programs.batch_sharding)
        plan_dev = loop.put_global(p, programs.vector)
        state, chunk_losses, chunk_norms = programs.run_chunk(
          params, state, images, plan_dev, steps_dev, weights_dev, round_index, round_key
        )
        losses.append(chunk_losses)
        grad_norms.append(chunk_norms)
        if (r + 1, j + 1) == kill_at:
          os.kill(os.getpid(), signal.SIGKILL)
      params, train["opt"], train["strategy"] = programs.finish_round(state, params, round_key)
      losses = np.concatenate([np.asarray(x) for x in jax.device_get(losses)], axis=1)
      grad_norms = np.concatenate([np.asarray(x) for x in jax.device_get(grad_norms)], axis=1)
      seconds = timing.now() - t0
      if profiling:
        jax.profiler.stop_trace()
        perf.log_profile(profile_dir, programs.chunk_hlo(), seconds, f"round {r + 1}")
      # Throughput leaves compilation out (the first round of a run compiles its programs).
      compiling = clock.seconds_between(t0, t0 + seconds)
      running = max(seconds - compiling, 1e-9)
      done = r + 1
      try:  # a non-finite step stops the run here (or, 'skip', is left out of the means)
        valid = divergence.screen(
          losses,
          plan.client_ids >= 0,
          where=f"round {done}",
          mode=config.on_nonfinite,
          describe=lambda i: f"client {plan.client_ids[i]} local step {plan.step_ids[i]}",
        )
      except divergence.DivergenceError:
        ckpt.close()  # the last good checkpoint may still be being written
        writer.close()
        raise
      losses = np.where(valid, losses, 0.0)
      busy = max(int(valid.sum()), 1)  # a sampled round may have no client at all
      loss = float(losses.sum() / busy)
      evaluated = probes.at_round(params, done) if probes else {}

      if loop.itstime(done, config.log_every_rounds, last):
        per_client = rounds.client_losses(losses, np.where(valid, plan.client_ids, -1), num_clients)
        # Mean global gradient norm of the round's client steps, and the new server params' norm.
        grad_norm = float(np.where(valid, grad_norms, 0.0).sum() / busy)
        scalars = dict(
          round=done,
          loss=loss,
          lr=float(programs.lr_fn(done)),
          img_per_s=int((plan.client_ids >= 0).sum()) * batch / running,
          s_per_round=seconds,
          grad_norm=grad_norm,
          param_norm=float(programs.param_norm(params)),
        )
        if compiling > 0:
          scalars["compile_s"] = compiling
        if config.on_nonfinite == "skip":
          scalars["skipped_steps"] = int((plan.client_ids >= 0).sum() - valid.sum())
        scalars.update(
          {f"loss/client_{c:02d}": float(per_client[c]) for c in np.flatnonzero(drawn.participants)}
        )
        if partial:  # who took part is also in the log line below
          scalars.update(clients=int(drawn.participants.sum()), dropped=int(drawn.dropped.sum()))
        if programs.chunk_flops:
          # Idle lane steps are computed too: this is what the hardware did.
          tflops = programs.chunk_flops * plan.client_ids.shape[1] / chunk_steps / running / 1e12
          scalars["tflops_per_device"] = tflops
          if perf.mfu(tflops * 1e12) is not None:
            scalars["mfu"] = perf.mfu(tflops * 1e12)
        scalars.update(strategy.report(train["strategy"], done))
        scalars.update(evaluated)
        writer.write_scalars(done, scalars)
        logging.info(
          "round %d/%d  loss %.4f  %.1f img/s  %.2f s/round%s%s",
          done,
          config.fed.num_rounds,
          loss,
          scalars["img_per_s"],
          seconds,
          f" ({compiling:.1f} s compiling)" if compiling > 0 else "",
          f"  clients {np.flatnonzero(drawn.participants).tolist()} dropped "
          f"{np.flatnonzero(drawn.dropped).tolist()}"
          if partial
          else "",
        )
      elif evaluated:
        writer.write_scalars(done, dict(round=done, **evaluated))
      progress(done)

      if loop.itstime(done, config.image_every_rounds, config.fed.num_rounds):
        shown = programs.preview(params, preview, preview_key)
        if jax.process_index() == 0:
          save = reconstruction.save_grid if teacher is None else feature_viz.save_similarity_grid
          png = workdir / "images" / f"round_{done:05d}.png"
          save(
            png,
            *[np.asarray(x) for x in jax.device_get(shown)],
            patch_size=mim_objectives.patch_size_of(config.model),
            title=f"round {done}, loss {loss:.4f}",
          )
          writer.write_images(done, {"reconstructions": writers.png_image(png)})
      if loop.itstime(done, config.attention_every_rounds, config.fed.num_rounds):
        maps = np.asarray(jax.device_get(attention_maps(params, preview)))
        if jax.process_index() == 0:
          attention_viz.save_attention(
            workdir / "attention" / f"round_{done:05d}.png",
            preview,
            maps,
            title=f"round {done}: last block, cls attention",
          )
      if loop.itstime(done, config.ckpt_every_rounds, config.fed.num_rounds):
        ckpt.save(done, params, train, data, dict(meta, round=done))
    if probes and jax.process_index() == 0:
      logging.info(
        "Evaluators, first and last round logged:\n%s",
        evaluators.summary(writers.read_jsonl(workdir / "metrics.jsonl"), workdir / "evals"),
      )
    writer.close()  # its event file's last events, and its thread
    clock.close()
    ckpt.close()
    data.close()
  return params
