"""The README's quickstart: loss, gradient, Hessian and Gauss-Newton products of a small MLP."""

import numpy as np

import hvp

net = hvp.Sequential(hvp.Linear(4, 16), hvp.Tanh(), hvp.Linear(16, 3))
loss = hvp.CrossEntropyLoss()
rng = np.random.default_rng(0)
X, y = rng.normal(size=(32, 4)), rng.integers(0, 3, size=32)
theta = net.init(seed=0)                      # flat parameter vector, shape (P,)

pt = hvp.linearize(net, loss, theta, X, y, l2=1e-3)   # one forward + backward pass
v = rng.normal(size=net.num_params)
Hv, Gv = pt.hvp(v), pt.ggnvp(v)               # exact Hessian and Gauss-Newton products
HV = pt.hvp(rng.normal(size=(net.num_params, 8)))     # 8 directions in one pass

print(f"P = {net.num_params}, loss = {pt.loss:.4f}, |grad| = {np.linalg.norm(pt.grad):.4f}")
print(f"v'Hv = {v @ Hv:.4f}, v'Gv = {v @ Gv:.4f}, block shape {HV.shape}")
H = pt.hvp(np.eye(net.num_params))            # the dense Hessian, column by column in one pass
print(f"symmetric: {np.allclose(H, H.T)}, smallest eigenvalue {np.linalg.eigvalsh(H)[0]:.4f}")
