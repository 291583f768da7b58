"""Several JAX processes as one run: a Cloud TPU pod, a GPU cluster, or processes on one machine.

`config.distributed` (nad_jax/defaults.py) says whether this process joins others and how it
finds them; `initialize` joins them through `jax.distributed.initialize`, before any JAX
backend starts. Fields left unset (`coordinator_address` '', `num_processes` and `process_id`
None) are detected by JAX where it knows the cluster (Cloud TPU, SLURM, Open MPI). Every
process then sees every device: the mesh, the jitted steps and the orbax checkpoints span
them all, and process 0 alone writes results.json and prints (docs/multihost.md).
"""

import socket
import time

import jax


class DistributedError(RuntimeError):
  """This process could not join the others; the message is one line naming the fields."""


ADDRESSING = ('coordinator_address', 'num_processes', 'process_id')


def initialize_arguments(section) -> dict:
  """The keyword arguments of `jax.distributed.initialize` for `config.distributed`.

  Args:
    section: the `config.distributed` section (a ConfigDict or any mapping), validated.

  Returns:
    {argument: value}; unset fields become None, which JAX detects from the cluster.
  """
  ids = section['local_device_ids']
  return dict(coordinator_address=section['coordinator_address'] or None,
              num_processes=section['num_processes'], process_id=section['process_id'],
              local_device_ids=None if ids is None else list(ids),
              initialization_timeout=section['initialization_timeout'],
              heartbeat_timeout_seconds=section['heartbeat_timeout'])


def initialize(section) -> bool:
  """Joins this process to the run's other processes where `section.enabled`.

  It must come before anything starts a JAX backend (a device query, an array). A process
  other than 0 first waits up to `section.initialization_timeout` seconds for the
  coordinator's port to open (JAX would otherwise abort with a C++ trace). Once joined, a
  process that sends no heartbeat for `section.heartbeat_timeout` seconds (killed, its host
  lost) makes JAX's coordination service end the others, so none waits forever.

  Args:
    section: the `config.distributed` section, validated (validation.RULES).

  Returns:
    Whether this process joined others (False where `section.enabled` is False).

  Raises:
    DistributedError: JAX could not detect a field left unset, or the coordinator did not
      open its port in time; the message names the fields and the address.
  """
  if not section['enabled']:
    return False
  arguments = initialize_arguments(section)
  address, process = arguments['coordinator_address'], arguments['process_id']
  timeout = section['initialization_timeout']
  if address and process and not reachable(address, timeout):
    raise DistributedError(
        f'distributed: process {process} found no coordinator at distributed.'
        f'coordinator_address {address} within distributed.initialization_timeout {timeout} s; '
        'start process 0 there, or give every process its address')
  try:
    jax.distributed.initialize(**arguments)
  except (ValueError, TypeError) as e:  # a field JAX could not detect
    unset = [f'distributed.{name}' for name in ADDRESSING if arguments[name] is None]
    raise DistributedError(
        f'distributed: {_first_line(e).rstrip(".")}; set {", ".join(unset) or "the fields"} '
        '(JAX detects them only on Cloud TPU, SLURM and Open MPI)') from None
  return True


def reachable(address: str, timeout: float) -> bool:
  """Whether a TCP connection to `address` ('host:port', IPv6 hosts in brackets) opens
  within `timeout` seconds, trying twice a second."""
  host, port = address.rsplit(':', 1)
  deadline = time.monotonic() + timeout
  while True:
    try:
      with socket.create_connection((host.strip('[]'), int(port)), timeout=1):
        return True
    except OSError:
      if time.monotonic() >= deadline:
        return False
      time.sleep(0.5)


def _first_line(error: Exception) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  text = lines[0] if lines else type(error).__name__
  return text if len(text) <= 200 else text[:197] + '...'
