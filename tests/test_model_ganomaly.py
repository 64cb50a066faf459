"""GANomaly: one summed loss must give the generator and the discriminator only their own gradients."""
import torch

from anomalens import create_model
from anomalens.data.sample import Batch


def test_summed_loss_splits_into_generator_and_discriminator_gradients():
    torch.manual_seed(0)
    model = create_model("ganomaly", input_size=32, width=8, latent_size=16).train()
    x = torch.rand(4, 3, 40, 40)
    batch = Batch(x, torch.zeros(4, dtype=torch.long), torch.zeros(4, 1, 40, 40), torch.zeros(4, dtype=torch.bool),
                  ["a"] * 4, ["good"] * 4)
    out = model.training_step(batch)
    d_params = list(model.discriminator.parameters())
    g_params = [p for n, p in model.named_parameters() if not n.startswith("discriminator.")]
    generator_part = out["loss"] - out["discriminator"]
    for grad in torch.autograd.grad(generator_part, d_params, retain_graph=True, allow_unused=True):
        assert grad is None or not grad.any()
    for grad in torch.autograd.grad(out["discriminator"], g_params, retain_graph=True, allow_unused=True):
        assert grad is None or not grad.any()
    # ...while each part does reach its own network
    assert any(g is not None and g.any() for g in torch.autograd.grad(out["discriminator"], d_params,
                                                                       retain_graph=True, allow_unused=True))
    assert all(g is not None for g in torch.autograd.grad(generator_part, list(model.encoder.parameters()),
                                                           retain_graph=True))


def test_score_is_the_latent_distance_and_the_map_keeps_the_input_size():
    torch.manual_seed(1)
    model = create_model("ganomaly", input_size=32, width=8, latent_size=16)
    images = torch.rand(2, 3, 48, 48)
    model.fit([Batch(images, torch.zeros(2, dtype=torch.long), torch.zeros(2, 1, 48, 48),
                     torch.zeros(2, dtype=torch.bool), ["a"] * 2, ["good"] * 2)], max_epochs=1)
    model.eval()
    with torch.no_grad():
        out = model(images)
        x = torch.nn.functional.interpolate(images * 2 - 1, size=(32, 32), mode="bilinear", antialias=True)
        z = model.encoder(x)
        z2 = model.encoder2(model.decoder(z))
    torch.testing.assert_close(out.score, (z - z2).pow(2).flatten(1).mean(1))
    assert out.anomaly_map.shape == (2, 1, 48, 48)
