"""`avatarcli sfd`: class-conditional ImageNet 256 images with SFD (semantic-first diffusion).

torch and the SFD modules are imported inside the command, so `avatarcli --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer

from avatarcli.errors import AvatarError, exit_code_for


def _parse_classes(values: list[str]) -> list[int]:
    try:
        return [int(part) for value in values for part in value.split(",") if part.strip()]
    except ValueError as exc:
        raise AvatarError(f"--class takes ImageNet class ids (integers), got {values}") from exc


def register(app: typer.Typer) -> None:
    @app.command("sfd")
    def sfd(
        weights: Path = typer.Option(..., "--weights", help="Folder with the SFD files in their published layout."),
        model: str = typer.Option("xl", "--model", help="xl (675M) or xxl (1.0B)."),
        classes: list[str] = typer.Option([], "--class", metavar="ID", help="ImageNet class id; repeat or comma-separate."),
        random: int = typer.Option(0, "--random", help="This many images with random classes."),
        balanced: int = typer.Option(0, "--balanced", help="This many images, equally many per class (FID protocol)."),
        guidance: str = typer.Option("autoguidance", "--guidance", help="autoguidance, cfg (null label) or none."),
        scale: float = typer.Option(None, "--scale", help="Guidance scale (default: the model's published 1.5)."),
        scale_tex: float = typer.Option(None, "--scale-tex", help="Guidance scale of the texture channels."),
        scale_sem: float = typer.Option(None, "--scale-sem", help="Guidance scale of the semantic channels."),
        steps: int = typer.Option(100, "--steps", help="Fixed steps of the Euler or Heun solver."),
        solver: str = typer.Option("euler", "--solver", help="Fixed-step solver: euler or heun."),
        adaptive: bool = typer.Option(False, "--adaptive", help="Adaptive dopri5 (the reference's default)."),
        seed: int = typer.Option(0, "--seed", help="Random seed; image i always gets the same noise."),
        batch_size: int = typer.Option(32, "--batch-size", help="Images per forward pass (memory, not results)."),
        output: Path = typer.Option(None, "-o", "--output", help="Write all images as one grid PNG."),
        images_dir: Path = typer.Option(None, "--images-dir", help="Write one PNG per image into this folder."),
        npz: Path = typer.Option(None, "--npz", help="Write arr_0 [N,256,256,3] uint8 for the ADM FID evaluator."),
        vae_weights: Path = typer.Option(None, "--vae-weights", help="Folder with the texture VAE, if not --weights."),
        device: str = typer.Option(None, "--device", help="cuda, cpu, ... (default: cuda when available)."),
        dtype: str = typer.Option("fp32", "--dtype", help="fp32 or bf16 for the networks."),
        compile_networks: bool = typer.Option(False, "--compile", help="torch.compile the denoisers (faster on GPUs)."),
    ) -> None:
        """Generate class-conditional ImageNet images with SFD."""
        try:
            from avatarcli.sfd import SfdJob, run_sfd

            job = SfdJob(
                weights_dir=weights, model=model, classes=_parse_classes(classes), random_count=random,
                balanced_count=balanced, guidance=guidance, scale=scale, scale_tex=scale_tex, scale_sem=scale_sem,
                solver="dopri5" if adaptive else solver, steps=steps, seed=seed, batch_size=batch_size,
                grid_path=output, images_dir=images_dir, npz_path=npz, vae_dir=vae_weights, device=device,
                dtype=dtype, compile=compile_networks,
            )
            result = run_sfd(job)
        except AvatarError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exit_code_for(exc)) from exc
        nfe = sum(result.nfe) / max(len(result.nfe), 1)
        outputs = [str(p) for p in (output, images_dir, npz) if p is not None]
        typer.echo(f"{len(result.labels)} images ({nfe:.0f} evaluations per batch) -> {', '.join(outputs)}")
