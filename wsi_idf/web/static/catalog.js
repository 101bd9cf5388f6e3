// Sort the catalog by a column when its header is clicked (numbers by their data-value).
document.querySelectorAll("table.sortable th").forEach((th, column) => {
  th.addEventListener("click", () => {
    const body = th.closest("table").tBodies[0];
    const key = (row) => {
      const cell = row.cells[column];
      if (!cell) return "";
      const value = cell.dataset.value;
      return value !== undefined ? parseFloat(value) : cell.textContent.trim().toLowerCase();
    };
    const ascending = th.dataset.order !== "asc";
    th.dataset.order = ascending ? "asc" : "desc";
    const rows = Array.from(body.rows);
    rows.sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * (ascending ? 1 : -1));
    rows.forEach((row) => body.appendChild(row));
  });
});
