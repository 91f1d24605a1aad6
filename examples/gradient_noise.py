"""The gradient noise scale along training: the batch size the problem asks for.

McCandlish et al. (2018), "An Empirical Model of Large-Batch Training": with G the gradient
of the mean loss and Σ the covariance of the per-example loss gradients ∇ℓ_n, the simple
noise scale B_simple = tr(Σ) / ‖G‖² is about the batch size beyond which a larger batch
stops buying proportionally faster progress. Both come from one linearization: with mean
reduction, ``pt.variance()`` is the elementwise variance of ∇ℓ_n = B·g_n, so its sum is
tr(Σ), and ``pt.grad`` is G (no L2 term here).

A small MLP is trained with SGD on the scikit-learn digits; every few epochs both are
measured on the whole training set.

    python examples/gradient_noise.py
"""

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import hvp


def main(epochs=30, batch=32, lr=0.05, momentum=0.9, seed=0):
    digits = load_digits()
    X = (digits.data / 16.0 - 0.5).astype(np.float64)
    X_train, X_test, y_train, y_test = train_test_split(X, digits.target, test_size=0.25, random_state=seed)

    net = hvp.Sequential(hvp.Linear(64, 64), hvp.Tanh(), hvp.Linear(64, 10))
    loss = hvp.CrossEntropyLoss()  # mean over the batch
    theta = net.init(seed=seed)
    velocity = np.zeros_like(theta)
    rng = np.random.default_rng(seed)

    print(f"digits: {len(X_train)} training, {len(X_test)} test examples; MLP 64-64-10 tanh, "
          f"P = {net.num_params}; SGD batch {batch}, lr {lr}, momentum {momentum}")
    print(f"{'epoch':>5}{'train loss':>12}{'test acc':>10}{'tr(Σ)':>11}{'‖G‖²':>11}{'B_simple':>10}")
    for epoch in range(epochs + 1):
        if epoch % 3 == 0:
            pt = hvp.linearize(net, loss, theta, X_train, y_train)  # the whole training set
            trace_sigma = float(pt.variance().sum())  # Σ_p Var_n(∇ℓ_n)_p
            grad_sq = float(pt.grad @ pt.grad)
            accuracy = np.mean(net.forward(theta, X_test).argmax(axis=1) == y_test)
            print(f"{epoch:>5}{pt.loss:>12.4f}{accuracy:>10.3f}{trace_sigma:>11.3g}{grad_sq:>11.3g}"
                  f"{trace_sigma / grad_sq:>10.1f}")
        order = rng.permutation(len(X_train))
        for start in range(0, len(order), batch):
            rows = order[start:start + batch]
            _, grad = hvp.loss_and_grad(net, loss, theta, X_train[rows], y_train[rows])
            velocity = momentum * velocity - lr * grad
            theta = theta + velocity
    print("B_simple grows as the gradient shrinks relative to its noise: a batch far below B_simple wastes\n"
          "steps on noise, one far above it wastes examples.")


if __name__ == "__main__":
    main()
